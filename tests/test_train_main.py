"""`prime-scale train` end to end on the embedded demo corpus: one process, and two through --nproc
(torchrun) with a 2-stage pipeline. Checks what a run leaves behind and that the loss falls."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.layers=2", "model.hidden=64", "model.heads=2", "optim.warmup_steps=5", "optim.lr=3e-3",
        "train.global_batch=8", "train.micro_batch=8", "train.log_every=5", "eval.batches=1", "eval.mc_samples=1"]
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "capped_positions"}


def _train(args, run_dir, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"})
    cmd = [sys.executable, "-m", "prime_scale.cli", "train", *args, f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_one_process_run_trains_validates_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    out = _train(["tiny-cpu", *TINY, "train.steps=40", "eval.every=20", "logging.wandb=offline"], run_dir)
    records = _metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    for r in train:
        assert REQUIRED <= r.keys() and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(8 * 128 / r["step_time_s"])
    # warm-up then cosine decay (recipe schedule), as the optimizer saw it
    lrs = [r["lr"] for r in train]
    assert lrs[0] == pytest.approx(3e-3 / 5) and max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] < lrs[3]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
    val = [r for r in records if "val_nll_bound" in r]
    assert [r["step"] for r in val] == [20, 40]
    for r in val:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_nll_bound"]))
        assert r["val_weights"] == "ema" and r["elapsed_s"] > 0
    manifest = json.loads((Path(os.environ["PRIME_SCALE_DEMO_DIR"]) / "L128" / "manifest.json").read_text())
    # eval.batches at step 20; the recipe's eval.final_batches = 0 at the last step: the whole split
    assert val[0]["val_tokens"] == 8 * 128 and val[-1]["val_tokens"] == manifest["splits"]["val"]["sequences"] * 128
    # bits per byte: an estimate over eval.batches (labelled in the record and on the console), the
    # text's own bytes over the whole split
    assert val[0]["val_bits_per_byte_estimated"] is True and val[-1]["val_bits_per_byte_estimated"] is False
    assert (f"validation @ step 20: NLL bound {val[0]['val_nll_bound']:.4f}" in out
            and f"{val[0]['val_bits_per_byte']:.4f} bits/byte, estimated" in out)
    assert f"{val[-1]['val_bits_per_byte']:.4f} bits/byte, estimated" not in out
    # the end: the bound beside its own tokenizer's unigram baseline and the demo's reference one
    last, ref = val[-1], manifest["source"]["reference_unigram"]
    assert f"valid bound (sub-token ELBO)" in out and f"{last['val_bits_per_byte']:.4f} bits/byte" in out
    assert (f"{last['val_unigram_bits_per_byte']:.4f} bits/byte  bound = "
            f"{last['val_bits_per_byte'] / last['val_unigram_bits_per_byte']:.3f} × this") in out
    assert (f"reference tokenizer ({ref['vocab_size']} pieces)" in out
            and f"bound = {last['val_bits_per_byte'] / ref['bits_per_byte']:.3f} × this" in out)
    assert "--- words: " in out and "% of the samples' " in out and "occur in the training text" in out
    # the resolved recipe records what the data decided
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["model"]["vocab_size"] == manifest["vocab_size"] and recipe["train"]["steps"] == 40
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run not under run.dir"
    assert "done: 40 steps, 40,960 tokens seen" in out
    assert f"NLL bound {val[-1]['val_nll_bound']:.4f}" in out and f"run directory: {run_dir}" in out
    assert "ETA" in out and "tok/s" in out


def test_nproc_two_runs_a_pipeline_through_torchrun(tmp_path):
    run_dir = tmp_path / "pp2"
    out = _train(["--nproc", "2", "tiny-cpu", *TINY, "parallel.pp=2", "train.micro_batch=4", "train.steps=10",
                  "eval.every=0", "logging.wandb=disabled"], run_dir)
    records = _metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == [1, 5, 10]  # written once, by rank 0, not once per rank
    assert "val_nll_bound" in records[-1] and all(math.isfinite(r["loss"]) for r in records)
    assert "world 2 = tp 1 × pp 2 × dp 1" in out and "accumulation 2" in out
    assert not (run_dir / "wandb").exists()
