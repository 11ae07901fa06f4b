"""Harness for the checkpoint tests: a tiny model of megatron-core tensor-parallel layers, trained by
real DeepSpeed engines (plain or pipeline) in gloo processes started with torchrun.

The test modules call `launch(nproc, scenario)`; the worker (checkpoint_worker.py, run as a script)
executes the scenario's steps and writes JSON results and reference tensors into the scenario's
directory.
The reference tensors are computed independently of prime_scale.checkpoint: the live parameters
(or DeepSpeed's fp32 master copies) gathered across TP ranks with torch.distributed and torch.cat.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
V, H, L = 37, 16, 6  # vocab, hidden, sequence length: odd sizes exercise ZeRO and TP padding
N_BLOCKS = 2
SEED = 1234
WORKER = str(Path(__file__).resolve().parent / "checkpoint_worker.py")


def launch(nproc: int, scenario: dict, workdir: Path, timeout: float = 240) -> dict:
    """Run the worker on nproc gloo processes; return rank 0's results (raises with the logs on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "scenario.json"
    spec.write_text(json.dumps(scenario))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(workdir),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={port}", "--master-addr=127.0.0.1", WORKER, str(spec)]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((workdir / "results.json").read_text())


def popen_single(args: list[str], workdir: Path) -> subprocess.Popen:
    """One worker process (world size 1) without torchrun, so that a test can kill it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(workdir), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load_refs(path_prefix: Path) -> dict:
    import glob

    import torch

    out = {}
    for f in sorted(glob.glob(f"{path_prefix}_pp*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out
