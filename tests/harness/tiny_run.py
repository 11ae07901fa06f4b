"""One tiny trained run, shared by the test modules that only need *a* trained checkpoint (eval,
sample, the lm-eval backend): 2 × 64, 10 steps on the demo corpus, converted with its EMA weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.layers=2", "model.hidden=64", "model.heads=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "train.global_batch=8", "train.micro_batch=8", "train.log_every=5", "eval.every=0", "eval.batches=1",
        "optim.ema=0.9", "logging.wandb=disabled", "eval.final_batches=null"]


def run(*args, timeout=300, env_extra=None):
    """`python -m prime_scale.cli ARGS` in the repository, outside any launcher environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_and_convert(root: Path) -> tuple[Path, Path]:
    """(run directory, consolidated EMA export) of a 10-step tiny run under root."""
    run_dir = root / "run"
    proc = run("train", "tiny-cpu", *TINY, "train.steps=10", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = root / "consolidated"
    proc = run("convert", str(run_dir), "--out", str(out), "--weights", "ema")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, out
