"""The open-file limit at start-up: under `ulimit -n 64` a training died in gloo's socket creation
(traceback, exit 1). Now the soft limit is raised when the hard limit allows, else a named error."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from prime_scale.errors import UserError
from prime_scale.parallel.fd_limit import descriptors_needed, ensure_open_file_limit

REPO = Path(__file__).resolve().parent.parent
TINY = ["tiny-cpu", "model.layers=1", "model.hidden=32", "model.heads=2", "model.seq_len=32", "train.steps=2",
        "train.global_batch=2", "train.micro_batch=2", "checkpoint.every=0", "eval.every=0", "--samples", "0",
        "logging.wandb=disabled", "eval.final_batches=null"]


class _Limits:
    """RLIMIT_NOFILE of a pretend process (the real one is this test process's own)."""

    RLIMIT_NOFILE, RLIM_INFINITY = resource.RLIMIT_NOFILE, resource.RLIM_INFINITY

    def __init__(self, soft, hard):
        self.soft, self.hard = soft, hard

    def getrlimit(self, _):
        return self.soft, self.hard

    def setrlimit(self, _, limits):
        self.soft, self.hard = limits


def test_the_need_grows_with_the_peers_and_workers():
    assert descriptors_needed(64, 2) > descriptors_needed(8, 2) > descriptors_needed(1, 0)
    assert descriptors_needed(512, 4, gloo=False) < 1024  # NCCL: no socket mesh per peer
    assert ensure_open_file_limit(8, 2, resource=_Limits(1 << 16, 1 << 16)) is None
    raised = _Limits(64, 1 << 16)
    note = ensure_open_file_limit(8, 2, resource=raised)
    assert raised.soft >= descriptors_needed(8, 2) and raised.hard == 1 << 16 and "from 64 to" in note
    with pytest.raises(UserError, match=r"open-file limit is 64 \(hard limit 100\).*ulimit -n"):
        ensure_open_file_limit(8, 2, resource=_Limits(64, 100))


def _train_under(tmp_path, soft: int, hard: int) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", "train", *TINY, f"run.dir={tmp_path / 'run'}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_training_under_ulimit_n_64_raises_its_soft_limit_and_trains(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    done = _train_under(tmp_path, 64, hard)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised the open-file limit from 64" in done.stdout


def test_a_hard_limit_too_low_is_named_before_anything_starts(tmp_path):
    done = _train_under(tmp_path, 64, 64)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "open-file limit is 64 (hard limit 64)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
