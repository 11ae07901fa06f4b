"""The launcher's environment: which rank this process is, how many there are, and its threads.

torchrun, the deepspeed launcher and SLURM wrappers set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; no variables at all means one process. Pure Python: the command line
checks a launch before any heavy import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from prime_scale.errors import UserError

# set by launch_local for its ranks: the launcher's pid, so that each rank dies with it
LAUNCHER_ENV = "PRIME_SCALE_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCH_HELP = ("start several processes with `torchrun --nproc-per-node N -m prime_scale.cli.train ...`, "
               "`deepspeed --num_gpus N --module prime_scale.cli.train ...` or `prime-scale train --nproc N`")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int_var(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; {LAUNCH_HELP}") from None
    if value < 0:
        raise UserError(f"environment variable {name}={value} is negative; {LAUNCH_HELP}")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_HELP = ("under srun, either give every task the rendezvous and let prime-scale read SLURM's ranks:\n"
              "  export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) MASTER_PORT=29500\n"
              "  srun --ntasks-per-node=GPUS --gpus-per-task=1 python -m prime_scale.cli.train RECIPE ...\n"
              "or start one torchrun per node:\n"
              "  srun --ntasks-per-node=1 torchrun --nnodes \"$SLURM_NNODES\" --nproc-per-node GPUS "
              "--rdzv-backend c10d --rdzv-endpoint \"$MASTER_ADDR:29500\" "
              "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 600 "
              "-m prime_scale.cli.train RECIPE ...\n"
              "(with #SBATCH --signal=USR1@120 a preemption notice then saves: docs/training.md)")


def _tasks_on_node(spec: str, node: int) -> Optional[int]:
    """This node's task count from SLURM's compressed per-node list: "4(x2),3" = 4, 4, 3."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "(x" in part:
                n, times = part.rstrip(")").split("(x")
                counts += [int(n)] * int(times)
            else:
                counts.append(int(part))
        except ValueError:
            return None
    return counts[node] if 0 <= node < len(counts) else None


def _slurm_env(environ: Mapping[str, str]) -> Optional[LaunchEnv]:
    """The layout of an srun step with several tasks and no torchrun (no RANK): SLURM_PROCID,
    SLURM_LOCALID and the step's task counts, mapped only when MASTER_ADDR/MASTER_PORT are given
    (the first node's name needs scontrol); without them, a clear refusal instead of N separate
    world-1 runs. Outside a step (a batch script's own process), SLURM's counts describe the
    allocation, not this process: None, one process as before."""
    if "SLURM_STEP_ID" not in environ and "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    world = _int_var(environ, "SLURM_STEP_NUM_TASKS") or _int_var(environ, "SLURM_NTASKS")
    rank = _int_var(environ, "SLURM_PROCID")
    if world is None or rank is None or world <= 1:
        return None
    addr, port = environ.get("MASTER_ADDR"), _int_var(environ, "MASTER_PORT")
    if not addr or port is None:
        raise UserError(f"this is task {rank} of an srun step of {world} tasks, but RANK/WORLD_SIZE (torchrun) "
                        "and MASTER_ADDR/MASTER_PORT are not set, so the tasks cannot meet (each would train "
                        f"alone on one GPU); {SLURM_HELP}")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    node = _int_var(environ, "SLURM_NODEID") or 0
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    local_world = _tasks_on_node(spec, node) if spec else _int_var(environ, "SLURM_NTASKS_PER_NODE")
    if local_rank is None or local_world is None:
        raise UserError(f"srun step of {world} tasks: SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE are needed to "
                        f"place task {rank} on its node; {SLURM_HELP}")
    if rank >= world or local_rank >= local_world:
        raise UserError(f"srun step: SLURM_PROCID={rank} / SLURM_LOCALID={local_rank} do not fit {world} tasks, "
                        f"{local_world} on this node; {SLURM_HELP}")
    return LaunchEnv(rank, world, local_rank, local_world, addr, port)


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """The rank layout the launcher gave this process. No launcher variables at all means a
    single process; an srun step of several tasks without torchrun is read from SLURM's variables
    (with MASTER_ADDR/MASTER_PORT given) or refused. A partial or inconsistent set is an error
    naming the variable."""
    environ = os.environ if environ is None else environ
    rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK")
    if rank is None and world is None and local_rank is None:
        slurm = _slurm_env(environ)
        return slurm if slurm is not None else LaunchEnv(0, 1, 0, 1, "127.0.0.1", _free_port())
    missing = [n for n, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)) if v is None]
    if missing:
        raise UserError(f"launcher environment incomplete: {', '.join(missing)} not set while "
                        f"{'RANK' if rank is not None else 'WORLD_SIZE' if world is not None else 'LOCAL_RANK'} "
                        f"is; {LAUNCH_HELP}")
    if world < 1:
        raise UserError(f"environment variable WORLD_SIZE={world} must be at least 1")
    if rank >= world:
        raise UserError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}; {LAUNCH_HELP}")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") or _int_var(environ, "LOCAL_SIZE") or 1
    if local_rank >= max(local_world, 1) and local_world > 1:
        raise UserError(f"environment variable LOCAL_RANK={local_rank} is not below the local world size "
                        f"{local_world}; {LAUNCH_HELP}")
    addr = environ.get("MASTER_ADDR")
    port = _int_var(environ, "MASTER_PORT")
    if world > 1 and (not addr or port is None):
        raise UserError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; {LAUNCH_HELP}")
    return LaunchEnv(rank, world, local_rank, max(local_world, 1), addr or "127.0.0.1", port or _free_port())


def threads_per_rank(local_world_size: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """OMP_NUM_THREADS when the user set it (torchrun sets 1), else the cores this process may use
    divided among the ranks of this node, so ranks never oversubscribe the cores."""
    environ = os.environ if environ is None else environ
    explicit = _int_var(environ, "OMP_NUM_THREADS")
    if explicit:
        return explicit
    return max(1, available_cores() // max(1, local_world_size))


# --------------------------------------------------------------------------- a local launcher


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")


def launch_local(nproc: int, module: str, argv: list[str], environ: Optional[Mapping[str, str]] = None,
                 pass_fds: Sequence[int] = ()) -> int:
    """Run `python -m module argv` as N ranks on this machine (the variables torchrun would set)
    and wait for them. If a rank fails the others are stopped. User errors of the ranks are printed
    once (each distinct message), with the exit code USER_ERROR, also when the peers of the ranks
    that raised it died in a collective afterwards; any other failure gives INTERNAL_ERROR, the
    ranks' tracebacks being on the console already. The ranks die with the launcher
    (die_with_launcher); SIGTERM / SIGUSR1 / SIGINT to the launcher are passed on to them, and it
    waits for them. `pass_fds`: open files the ranks inherit (the run directory's lock)."""
    import subprocess
    import sys
    import tempfile
    import time

    from prime_scale.errors import ERROR_DIR_ENV, INTERNAL_ERROR, INTERRUPTED, PREEMPTED, USER_ERROR

    check_nproc(nproc)
    base = dict(os.environ if environ is None else environ)
    base.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    base[LAUNCHER_ENV] = str(os.getpid())
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="prime-scale-launch-") as errors:
        procs = []
        for rank in range(nproc):
            env = dict(base, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            env[ERROR_DIR_ENV] = errors
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env, pass_fds=tuple(pass_fds)))
        with _forwarding_stop_signals(procs):
            codes, first_failed = _wait_all(procs, time)
        messages = sorted({f.read_text().strip() for f in Path(errors).iterdir()})
    for line in messages:
        print(line, file=sys.stderr)
    if all(c == 0 for c in codes):
        return 0
    if all(c in (0, PREEMPTED) for c in codes):  # stopped on request (a signal, Ctrl-C), after a checkpoint
        return PREEMPTED
    if any(c in (INTERRUPTED, -signal.SIGINT) for c in codes):  # a second Ctrl-C: aborted unsaved
        return INTERRUPTED
    if messages and all(c in (0, USER_ERROR) or c < 0 for c in codes):
        return USER_ERROR
    if messages and all(codes[r] == USER_ERROR for r in first_failed):
        # a user error raised on some ranks only: its peers then fail in the collective it left
        # (gloo/NCCL connection errors, with tracebacks); the named error is the cause
        peers = sorted(r for r, c in enumerate(codes) if c not in (0, USER_ERROR))
        print(f"prime-scale train: rank(s) {peers} failed after rank(s) {first_failed} stopped on the error "
              "above (their tracebacks are its consequence)", file=sys.stderr)
        return USER_ERROR
    bad = {r: c for r, c in enumerate(codes) if c != 0}
    print(f"prime-scale train: rank(s) {sorted(bad)} failed (exit codes {bad})", file=sys.stderr)
    return INTERNAL_ERROR


@contextlib.contextmanager
def _forwarding_stop_signals(procs):
    """While the ranks run, a polite stop of the launcher (SIGTERM, SIGUSR1: a scheduler, `kill`;
    SIGINT: Ctrl-C, `kill -INT`) goes to the ranks, which save and exit (a second SIGINT aborts
    them), instead of killing the launcher (and with it the ranks, unsaved). SIGINT is handled
    whatever the disposition this process inherited: a job started with `&` or nohup inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so `kill -INT` did
    nothing. A Ctrl-C in a terminal reaches the ranks twice (their process group and this
    forward); they count the two as one. Signal handlers can only be set from the main thread;
    elsewhere nothing is forwarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# the command lines of the launchers whose workers we tie to them: torchrun's agent and the deepspeed
# launcher's per-node `deepspeed.launcher.launch` start the workers as their direct children
EXTERNAL_LAUNCHERS = ("torchrun", "torch.distributed.run", "deepspeed.launcher.launch")


def die_with_launcher(environ=None) -> None:
    """First thing in a rank: the rank gets SIGKILL as soon as its local launcher dies (kill -9, a
    crash, the OOM killer), instead of training on unsupervised. Our --nproc launcher names itself
    in the environment; a torchrun agent or the deepspeed launcher is recognised as the direct
    parent by its command line (Linux).

    SIGKILL rather than SIGTERM: a dead launcher is a hard stop (a polite one reaches the ranks as
    a forwarded SIGTERM while the launcher lives), all ranks then stop at once instead of one
    waiting in a collective for another, and checkpoints are published atomically, so the newest
    complete one is intact for --resume auto. Linux: prctl(PR_SET_PDEATHSIG); elsewhere a thread
    that polls the parent pid every 0.5 s (our launcher only)."""
    environ = os.environ if environ is None else environ
    raw = environ.pop(LAUNCHER_ENV, None)  # the rank's own subprocesses have another parent
    if raw:
        launcher = int(raw)
    elif "LOCAL_RANK" in environ and _is_external_launcher(os.getppid()):
        launcher = os.getppid()
    else:
        return
    if not _parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(launcher,), name="die-with-launcher", daemon=True).start()
    if os.getppid() != launcher:  # the launcher died before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)
    runner = _parent_of(launcher)
    if not raw and environ.get("LOCAL_RANK") == "0" and runner is not None and _is_deepspeed_runner(runner):
        # the per-node launcher asks for no parent-death signal: kill -9 of the top `deepspeed` runner
        # left it and its workers training on. Started by the runner itself (one node), it is
        # re-parented when the runner dies: that is the runner's death, seen from here. The runner
        # also dies of a polite stop (on one node it handles no signal: Ctrl-C, SLURM's SIGTERM), so
        # the stop is polite: SIGTERM to the launcher, which terminates all its workers at once
        # (they save at the step boundary and exit 3) and kills them 30 s later
        threading.Thread(target=_watch_runner, args=(launcher, runner), name="stop-with-runner", daemon=True).start()


def process_argv(pid: int) -> list[str]:
    """The command line of process `pid` (Linux); empty where it cannot be read (not Linux, gone)."""
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _is_external_launcher(pid: int) -> bool:
    words = [os.path.basename(a) for a in process_argv(pid)[:4]]
    return any(name in words for name in EXTERNAL_LAUNCHERS)


def _parent_of(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_deepspeed_runner(pid: int) -> bool:
    """The top `deepspeed` command (deepspeed/launcher/runner.py), which starts one node's launcher
    as its child; on other nodes the launcher's parent is pdsh's remote shell instead."""
    words = [os.path.basename(a) for a in process_argv(pid)[:3]]
    return "deepspeed" in words or "deepspeed.launcher.runner" in words


def _watch_runner(launcher: int, runner: int, interval_s: float = 0.5) -> None:
    import time

    while _parent_of(launcher) == runner:
        time.sleep(interval_s)
    with contextlib.suppress(ProcessLookupError):  # gone: the parent-death signal takes the ranks
        os.kill(launcher, signal.SIGTERM)


def _parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(launcher: int, interval_s: float = 0.5) -> None:
    import time

    while os.getppid() == launcher:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_all(procs, time, grace_s: float = 10.0) -> tuple[list[int], list[int]]:
    """Exit codes of all ranks, and the ranks that failed first (those seen failed at the first poll
    that saw any failure: the cause; the peers that fail after it, in a collective whose partner
    left, are its consequences). Once one fails, the others get grace_s to finish, then are killed."""
    failed_at, first = None, []
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.monotonic()
            first = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    if not first:
        first = [r for r, p in enumerate(procs) if p.returncode != 0]
    return [p.returncode for p in procs], first
