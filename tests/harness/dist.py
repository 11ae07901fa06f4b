"""Run a function in N real processes (gloo), the way a launcher would, with a timeout.

`launch(nproc, "test_module:function", kwargs)` starts N Python processes with the launcher
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
calls `function(**kwargs)` in each, and returns the per-rank return values (JSON). A worker may
bring up several layouts one after another: `port(k)` gives it a fresh rendezvous port for the k-th.
On a timeout or a failing rank every process is killed and the ranks' stderr tails are reported.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
PORTS_PER_JOB = 16


def _free_base_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + PORTS_PER_JOB >= 65535:
            continue
        ok = True
        for p in range(base, base + PORTS_PER_JOB):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def port(k: int) -> dict:
    """Launcher environment for this process's k-th layout (a fresh rendezvous port)."""
    env = dict(os.environ)
    env["MASTER_PORT"] = str(int(os.environ["HARNESS_BASE_PORT"]) + k)
    return env


def launch(nproc: int, target: str, kwargs: dict | None = None, timeout: float = 240.0,
           extra_env: dict | None = None) -> list:
    base = _free_base_port()
    with tempfile.TemporaryDirectory(prefix="prime-dist-") as tmp:
        procs, logs = [], []
        for rank in range(nproc):
            env = dict(os.environ)
            env.update({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(base),
                        "HARNESS_BASE_PORT": str(base), "OMP_NUM_THREADS": "1",
                        "PYTHONWARNINGS": "ignore"})
            env.update(extra_env or {})
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__)), target, json.dumps(kwargs or {}), str(Path(tmp) / f"rank{rank}.json")],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(TESTS.parent)))
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"timeout after {timeout:.0f} s"
                break
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                time.sleep(2.0)  # let peers report their side too
                failed = f"rank(s) {bad} exited with {[procs[r].returncode for r in bad]}"
                break
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = f"exit codes {[p.returncode for p in procs]}"
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {r} ---\n" + "".join(log.readlines()[-40:]))
            log.close()
        if failed:
            raise AssertionError(f"{target} on {nproc} processes: {failed}\n" + "\n".join(tails))
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def _main(target: str, kwargs_json: str, out: str) -> None:
    sys.path.insert(0, str(TESTS))
    module_name, func_name = target.split(":")
    result = getattr(importlib.import_module(module_name), func_name)(**json.loads(kwargs_json))
    tmp = out + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, out)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
