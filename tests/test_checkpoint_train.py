"""Checkpoints in the real training loop (`prime-scale train`, 2 gloo processes, CPU, fp32):
N steps + `--resume auto` + N steps gives exactly the losses of 2N uninterrupted steps, for TP=2 and
for ZeRO-2 (dropout and EMA on, compared through metrics.jsonl); a new run over an old run's
checkpoints is refused; and `prime-scale eval` of the last checkpoint in one process equals the run's
own validation under its TP=2 and DP=2 layouts (one estimator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prime_scale import cli

REPO = Path(__file__).resolve().parent.parent
N = 3
COMMON = ["model.layers=2", "model.hidden=64", "model.heads=4", "model.seq_len=32", "model.dropout=0.1",
          "optim.schedule=constant", "optim.warmup_steps=2", "optim.ema=0.9", "train.global_batch=8",
          "train.micro_batch=2", "train.log_every=1", "eval.every=0", "eval.batches=2", "eval.mc_samples=1",
          "checkpoint.every=2", "checkpoint.keep_last=2", "logging.wandb=disabled", "data.num_workers=0", "eval.final_batches=null"]
LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.zero_stage=1"], "zero2": ["parallel.tp=1", "parallel.zero_stage=2"]}


def _env(demo: Path, work: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PRIME_SCALE_DEMO_DIR=str(demo), TMPDIR=str(work),
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), DS_ACCELERATOR="cpu")


def _train(demo: Path, run_dir: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prime_scale.cli", "train", *COMMON, *overrides, f"run.dir={run_dir}",
           "--nproc", "2", *extra]
    return subprocess.Popen(cmd, env=_env(demo, run_dir.parent), cwd=run_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(procs: dict, timeout: float = 240) -> dict:
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        out[name] = (p.returncode, stdout, stderr)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    demo = work / "demo"
    env = _env(demo, work)
    # build the demo corpus once, before four runs would queue on its lock
    subprocess.run([sys.executable, "-c", "from data_prep.demo import ensure_demo_corpus; "
                    "ensure_demo_corpus(seq_len=32)"], env=env, check=True, capture_output=True)
    first = {}
    for name, lay in LAYOUTS.items():
        first[f"{name}_a"] = _train(demo, work / name / "a", lay + [f"train.steps={N}"])
        first[f"{name}_c"] = _train(demo, work / name / "c", lay + [f"train.steps={2 * N}"])
    done = _finish(first)
    for name, (rc, _, err) in done.items():
        assert rc == 0, f"{name}:\n{err[-4000:]}"
    second = {f"{name}_b": _train(demo, work / name / "a", lay + [f"train.steps={2 * N}"], "--resume", "auto")
              for name, lay in LAYOUTS.items()}
    done.update(_finish(second))
    return work, demo, done


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_gives_the_uninterrupted_losses(runs, layout):
    work, _, done = runs
    rc, out, err = done[f"{layout}_b"]
    assert rc == 0, err[-4000:]
    assert f"resumed from {work / layout / 'a' / 'checkpoints' / f'step_{N}'}" in out
    resumed = _metrics(work / layout / "a")
    straight = _metrics(work / layout / "c")
    assert [r["step"] for r in resumed] == list(range(1, 2 * N + 1))  # each step once, across both runs
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key  # bit for bit
    # the final validation (EMA weights, restored from the checkpoint) agrees exactly too
    assert resumed[-1]["val_nll_bound"] == straight[-1]["val_nll_bound"]
    names = sorted(p.name for p in (work / layout / "a" / "checkpoints").iterdir() if p.is_dir())
    assert names == [f"step_{2 * N - 2}", f"step_{2 * N}"]  # every=2, keep_last=2


def test_new_run_over_old_checkpoints_is_refused(runs, capsys):
    work, _, _ = runs
    run = work / "tp2" / "c"
    rc = cli.main(["train", *COMMON, *LAYOUTS["tp2"], f"run.dir={run}", "--nproc", "2"])  # a valid layout
    assert rc == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_validation_equals_eval_of_the_checkpoint(runs, layout, tmp_path):
    """One estimator: the run's val_nll_bound at its last step (under TP = 2, or DP = 2 with ZeRO-2)
    equals `prime-scale eval` of that step's checkpoint in one process, on the same sequences (the
    first eval.batches global batches of the split) and noise draws; the standard errors agree too."""
    work, demo, _ = runs
    run = work / layout / "c"
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "prime_scale.cli", "eval", str(run), "--batch-size", "8", "--max-batches", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(demo, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evaluated = json.loads(out.read_text())
    validated = _metrics(run)[-1]
    assert evaluated["tokens"] == validated["val_tokens"] and evaluated["sequences"] == validated["val_sequences"] == 16
    assert abs(evaluated["nll_per_token"] - validated["val_nll_bound"]) < 1e-5
    assert abs(evaluated["stderr"] - validated["val_stderr"]) < 1e-5
    assert abs(evaluated["bits_per_byte"] - validated["val_bits_per_byte"]) < 1e-5
    assert evaluated["unigram_nll_per_token"] == pytest.approx(validated["val_unigram_nll"], rel=1e-9)
    cfg = json.loads((run / "checkpoints" / f"step_{2 * N}" / "manifest.json").read_text())["recipe"]
    assert evaluated["seed"] == cfg["seed"] and evaluated["weights"] == "ema"
