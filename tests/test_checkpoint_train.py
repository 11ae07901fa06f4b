"""Checkpoints in the real training loop (`prime-scale train`, 2 gloo processes, CPU, fp32):
N steps + `--resume auto` + N steps gives exactly the losses of 2N uninterrupted steps, for TP=2 and
for ZeRO-2 (dropout and EMA on, compared through metrics.jsonl); a new run over an old run's
checkpoints is refused; and the consolidated checkpoint evaluated in one process (TP=1, the evaluator core on
dense logits) equals the run's own validation under its original TP=2 layout."""

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
          "checkpoint.every=2", "checkpoint.keep_last=2", "logging.wandb=disabled", "data.num_workers=0"]
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


def test_consolidated_checkpoint_evaluates_like_the_sharded_run(runs, tmp_path):
    work, demo, _ = runs
    run = work / "tp2" / "c"
    out = tmp_path / "consolidated"
    assert cli.main(["convert", str(run), "--out", str(out), "--weights", "ema"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source_layout"]["tp"] == 2 and config["weights"] == "ema"
    # the TP=2 run validated eval.batches × (global batch / micro batch) micro-batches (dp = 1)
    n_micro = 2 * (8 // 2)
    proc = subprocess.run([sys.executable, __file__, str(run / "recipe.yaml"), str(out), str(n_micro)],
                          env=_env(demo, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    sharded = _metrics(run)[-1]
    assert single["tokens"] == sharded["val_tokens"]
    assert abs(single["nll_per_token"] - sharded["val_nll_bound"]) < 1e-5


def _evaluate_consolidated(recipe: str, consolidated: str, n_micro: int) -> dict:
    """One process, TP = 1: the consolidated weights in a fresh model, the evaluator core on dense
    logits, the validation batches and noise keys the trainer used."""
    import torch

    from prime_scale.export.reshard import load_consolidated_into
    from prime_scale.config import load_recipe
    from prime_scale.data.loader import build_loader
    from prime_scale.noise import EVAL_NOISE_STEP
    from prime_scale.evaluation import evaluate_bound
    from prime_scale.model import ModelArgs, PrimeTransformer, name_map
    from prime_scale.parallel import state as pstate

    cfg = load_recipe(recipe, ["parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=0"])
    pstate.init(cfg)
    model = PrimeTransformer(ModelArgs.from_config(cfg, cfg.model.vocab_size))
    load_consolidated_into(model, consolidated, name_map=name_map(model))
    model.eval()
    loader = build_loader(cfg, "val", 0, 1, cfg.train.micro_batch, cfg.seed)
    batches = []
    for i, raw in enumerate(loader):
        if i >= n_micro:
            break
        valid = raw.get("valid", torch.ones(raw["input_ids"].shape[0], dtype=torch.bool)).bool()
        batches.append({"input_ids": raw["input_ids"][valid], "index": raw["index"][valid]})
    result = evaluate_bound(model, batches, vocab_size=cfg.model.vocab_size, ell=cfg.model.ell, seed=cfg.seed,
                            mc_samples=1, global_batch=cfg.train.global_batch, step_key=EVAL_NOISE_STEP,
                            carry_over=cfg.model.carry_over)
    pstate.destroy()
    return {"nll_per_token": result.nll_per_token, "tokens": result.tokens}


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(_evaluate_consolidated(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
