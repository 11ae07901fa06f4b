"""What the launcher does with a stop signal, and whether a checkpoint fits in the grace it leaves.

A rank saves and exits 3 when a stop signal reaches it (train.py). Whether it reaches it, and how long
the rank then has before SIGKILL, is the launcher's decision, read from the source of the launchers
(torch 2.13, deepspeed 0.19.8, SLURM's defaults):

- torchrun handles only the signals in `--signals-to-handle` (default SIGTERM,SIGINT,SIGHUP,SIGQUIT;
  workers are in sessions of their own, so a signal to torchrun's process group never reaches them).
  A handled signal is forwarded to the workers, which then get `--shutdown-timeout` seconds
  (default 30) before SIGKILL. Any other signal - SIGUSR1 from `#SBATCH --signal=USR1@120` -
  kills torchrun, and the workers die with it (their parent-death signal) before any save.
- the deepspeed launcher's per-node `deepspeed.launcher.launch` forwards SIGTERM and SIGINT and kills
  the workers 30 s later (fixed in its code); SIGUSR1 kills it, and the workers with it.
- SLURM sends SIGKILL KillWait seconds (default 30) after the SIGTERM of a time limit or a
  preemption; `--signal=USR1@N` asks for SIGUSR1 N seconds before that.
- `prime-scale train --nproc N` forwards SIGTERM and SIGUSR1 and waits for its ranks.

Pure Python, like launch.py: it only reads the environment and the parent's command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from prime_scale.parallel.launch import process_argv

TORCHRUN_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
TORCHRUN_DEFAULT_SHUTDOWN_S = 30.0
DEEPSPEED_LAUNCH_GRACE_S = 30.0  # deepspeed/launcher/launch.py terminate_process_tree: wait_procs(timeout=30)
SLURM_DEFAULT_KILL_WAIT_S = 30.0
# the line the docs give (docs/training.md, "Stopping early"); 600 s covers prime-7b's save on a slow
# shared filesystem with room to spare - size it to your own save (the "checkpoint ... s" line)
TORCHRUN_PREEMPTION_FLAGS = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                             "--shutdown-timeout", "600")
# what a save here took per GiB a rank writes (bench/bench_checkpoint.py: 224 MiB in 0.56 s on local
# disk with fsync and hashes, docs/benchmarks.md); a shared filesystem under a whole job's save is
# slower, so the start-up estimate assumes a quarter of it and the first save's own time is checked
SAVE_S_PER_GIB = 10.0


@dataclass(frozen=True)
class StopGrace:
    """The launcher above this rank and what a stop signal to it gives the rank."""

    launcher: str  # "torchrun", "the deepspeed launcher", "srun", "prime-scale train --nproc", "none"
    forwarded: frozenset  # the signal names that reach the ranks as a request to stop
    grace_s: Optional[float]  # seconds from the stop signal to SIGKILL; None: the launcher waits


def _flag(argv: Sequence[str], names: Sequence[str]) -> Optional[str]:
    """The value of a command-line option written `--name value` or `--name=value`."""
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def parent_argv() -> list[str]:
    """The command line of this process's parent (Linux); empty where it cannot be read."""
    return process_argv(os.getppid())


def _torchrun(argv: Sequence[str], environ: Mapping[str, str]) -> StopGrace:
    # the agent exports its final list to its workers; the flag and its PET_ variable are the fallbacks
    signals = (environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
               or _flag(argv, ("--signals-to-handle", "--signals_to_handle"))
               or environ.get("PET_SIGNALS_TO_HANDLE") or TORCHRUN_DEFAULT_SIGNALS)
    timeout = (_flag(argv, ("--shutdown-timeout", "--shutdown_timeout")) or environ.get("PET_SHUTDOWN_TIMEOUT")
               or environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
    try:
        grace = float(timeout) if timeout else TORCHRUN_DEFAULT_SHUTDOWN_S
    except ValueError:
        grace = TORCHRUN_DEFAULT_SHUTDOWN_S
    return StopGrace("torchrun", frozenset(s.strip() for s in signals.split(",") if s.strip()), grace)


def stop_grace(environ: Mapping[str, str], argv_of_parent: Sequence[str], own_launcher: bool) -> StopGrace:
    """How the launcher that started this rank treats SIGTERM and SIGUSR1."""
    words = [os.path.basename(a) for a in argv_of_parent[:4]]
    if own_launcher:
        return StopGrace("prime-scale train --nproc", frozenset({"SIGTERM", "SIGUSR1", "SIGINT"}), None)
    if "torchrun" in words or "torch.distributed.run" in words:
        return _torchrun(argv_of_parent, environ)
    if "deepspeed.launcher.launch" in words:
        return StopGrace("the deepspeed launcher", frozenset({"SIGTERM", "SIGINT"}), DEEPSPEED_LAUNCH_GRACE_S)
    if "SLURM_JOB_ID" in environ:  # srun's tasks get the job's signals themselves
        return StopGrace("srun", frozenset({"SIGTERM", "SIGUSR1", "SIGINT"}), SLURM_DEFAULT_KILL_WAIT_S)
    return StopGrace("none", frozenset({"SIGTERM", "SIGUSR1", "SIGINT"}), None)


def estimated_save_s(bytes_per_rank: float) -> float:
    return bytes_per_rank / 2**30 * SAVE_S_PER_GIB


def preemption_warnings(grace: StopGrace, save_s: float, slurm: bool, measured: bool = False) -> list[str]:
    """What would lose a preemption's checkpoint under this launcher, each with the fix. `save_s`:
    a checkpoint's time, estimated at start-up or measured after a save (`measured`)."""
    how = "took" if measured else f"is estimated at (at {SAVE_S_PER_GIB:g} s per GiB a rank writes)"
    fix = " ".join(TORCHRUN_PREEMPTION_FLAGS[:2])
    out = []
    if grace.launcher == "torchrun" and slurm and "SIGUSR1" not in grace.forwarded:
        out.append(f"torchrun does not forward SIGUSR1 (its --signals-to-handle is "
                   f"{','.join(sorted(grace.forwarded))}): SIGUSR1 (#SBATCH --signal=USR1@N) kills it and the "
                   f"ranks with it, unsaved. Start torchrun with {fix} (or export "
                   f"PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)")
    if grace.grace_s is not None and save_s > grace.grace_s:
        need = int(max(60.0, 2 * save_s))
        hint = {"torchrun": f"start torchrun with --shutdown-timeout {need} (or export PET_SHUTDOWN_TIMEOUT={need})",
                "the deepspeed launcher": "its 30 s are fixed: stop the run with train.max_minutes, or launch "
                                          f"with torchrun --shutdown-timeout {need}",
                "srun": f"unless the job asks for an early SIGUSR1 (#SBATCH --signal=USR1@{need + 60}), set "
                        "train.max_minutes a few minutes under the time limit"}[grace.launcher]
        out.append(f"a checkpoint of this run {how} {save_s:.0f} s, but {grace.launcher} kills the ranks "
                   f"{grace.grace_s:g} s after a stop signal{' (SLURM KillWait default)' if grace.launcher == 'srun' else ''}: "
                   f"a preemption would lose the save; {hint}")
    return out
