"""One training per run directory: an exclusive lock on `run.dir` (and on `checkpoint.dir` when it
lies outside run.dir), taken before anything there is read for --resume or written.

Two trainings in one directory corrupt each other: the second moves the first's metrics aside,
rewrites recipe.yaml, and their checkpoint saves and retention delete each other's folders. The
lock is flock(2) on `<dir>/.lock`. The kernel drops it when the holder exits, however it exits
(kill -9 too), so there is no stale lock to clean up. The holder writes its host, pid, start time
and command into the file, and a refused run names them.

Who holds it (prime_scale/cli/train.py decides): a single process; the `--nproc` launcher, whose
ranks receive its open lock files (an flock belongs to the open file, so the ranks share the
launcher's lock instead of competing for it, and keep it while they run) and check by inode that
they did; under torchrun or the deepspeed launcher only global rank 0 (the other ranks write
into run.dir only in collective checkpoint saves, which cannot proceed without rank 0).

The file is never deleted or replaced: the lock is on an inode, and a holder that unlinked the
file would let a second run lock a fresh file of the same name while the first still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from prime_scale.errors import UserError

LOCK_NAME = ".lock"
INHERITED_ENV = "PRIME_SCALE_HELD_LOCKS"  # a launcher's open lock files, passed to its ranks: fd numbers


def lock_dirs(cfg) -> list[tuple[str, Path]]:
    """(recipe key, directory) of what a training writes: run.dir, and checkpoint.dir when it is
    not inside run.dir (two runs with different run.dirs may still share a checkpoint.dir)."""
    run = Path(cfg.run.dir)
    out = [("run.dir", run)]
    if cfg.checkpoint.dir:
        ckpt = Path(cfg.checkpoint.dir)
        if ckpt.resolve() != run.resolve() and run.resolve() not in ckpt.resolve().parents:
            out.append(("checkpoint.dir", ckpt))
    return out


class HeldLocks:
    """The lock files this process holds open (closing the last open copy releases a lock)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def child_env(self) -> dict:
        """What a launcher adds to its ranks' environment (with pass_fds=self.fds)."""
        return {INHERITED_ENV: ",".join(map(str, self.fds))} if self.fds else {}

    def holds(self, fd: int) -> bool:
        st = os.fstat(fd)
        return any(os.path.samestat(st, os.fstat(mine)) for mine in self.fds)

    def release(self) -> None:
        # close, never LOCK_UN: a rank's copy shares its launcher's lock, and unlocking it would
        # free the directory while the other ranks still train
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@contextmanager
def hold(directories: list[tuple[str, Path]], take: bool = True) -> Iterator[HeldLocks]:
    """Hold the lock on every directory for the duration, or raise a UserError naming the training
    that holds one. A rank of the `--nproc` launcher claims the lock files it inherited; otherwise the
    locks are taken when `take` (False: a rank other than global rank 0 of an external launcher)."""
    raw = os.environ.pop(INHERITED_ENV, None)  # the rank's own subprocesses must not claim them
    inherited = [int(fd) for fd in raw.split(",") if fd.strip().isdigit()] if raw else []
    held = HeldLocks()
    try:
        for key, directory in directories:
            fd = _claim_inherited(directory, inherited)
            if fd is None and take:
                fd = _acquire(key, directory, held)
            if fd is not None:
                held.fds.append(fd)
        yield held
    finally:
        held.release()


def _claim_inherited(directory: Path, fds: list[int]) -> Optional[int]:
    """The inherited fd that is this directory's lock file, once checked to hold its lock."""
    try:
        want = os.stat(Path(directory) / LOCK_NAME)
    except OSError:
        return None
    for fd in fds:
        try:
            if not os.path.samestat(os.fstat(fd), want):
                continue
            # succeeds at once on the launcher's open file (it holds the lock), fails on any other
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        os.set_inheritable(fd, False)
        return fd
    return None


def _acquire(key: str, directory: Path, held: HeldLocks) -> Optional[int]:
    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{key}={directory}: cannot create the run's lock file {path} ({e.strerror}); give "
                        f"this run a {key} it may write to") from None
    if held.holds(fd):  # the same directory by another path (a symlink, a bind mount): locked already
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0))
        os.close(fd)
        raise UserError(f"{key}={directory} is in use by another training ({holder}; lock file {path}). Wait "
                        f"for it to finish or stop it, or give this run another {key}") from None
    except OSError as e:  # e.g. ENOLCK or EOPNOTSUPP: a filesystem without working flock
        os.close(fd)
        print(f"prime-scale train: warning: cannot lock {path} ({e.strerror}); a second training in {directory} "
              "will not be detected on this filesystem", file=sys.stderr, flush=True)
        return None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": " ".join(sys.argv)[:1000]}
    os.ftruncate(fd, 0)  # in place: the lock belongs to this inode
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _describe(raw: bytes) -> str:
    try:
        r = json.loads(raw.decode())
        return f"pid {r['pid']} on host {r['host']}, started {r['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name into the lock file yet"
