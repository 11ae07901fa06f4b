"""A bounded set of open shard files, read with pread, and the open-file limit named when it is hit.

A source reads its shards through descriptors it keeps: opening a file once per sample (what
mosaicml-streaming's MDS reader does) costs a metadata-server round trip per sample on Lustre or
NFS. Keeping one descriptor per shard forever instead runs into the open-file limit (RLIMIT_NOFILE,
1024 soft by default: about 64 GB of 64 MB shards) in every rank and DataLoader worker. So a source
keeps at most `KEEP` descriptors, closing the least recently used one first: reads from a shard come
in runs (the loader's order visits a few shards at a time), so a small set rarely reopens a file.

Running out of descriptors anyway (other code holding them, a very low `ulimit -n`) is EMFILE or
ENFILE. Neither says anything about the shard: it is named as the limit it is, with what to do.
"""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from prime_scale.errors import UserError

KEEP = 256  # descriptors kept per source (each process has one source per split it reads)
LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


def is_fd_limit(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in LIMIT_ERRNOS


def fd_limit_error(path, e: OSError) -> UserError:
    """The named error for EMFILE / ENFILE while opening `path` (the file is not damaged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if e.errno == errno.ENFILE:
        what = ("the system's open-file table is full (ENFILE, /proc/sys/fs/file-max): too many open files on this "
                "machine, not in this process; close other jobs' files or raise fs.file-max")
    else:
        hard_s = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        what = (f"too many open files in this process (EMFILE: RLIMIT_NOFILE soft limit {soft}, hard {hard_s}; "
                "`ulimit -n` shows it): raise it before launching (`ulimit -n 65536` in the job script, or "
                f"LimitNOFILE= for a service; at most the hard limit), or use fewer data.num_workers")
    return UserError(f"{path}: cannot open it: {what}. The file is not damaged")


def _in_use() -> int:
    """Descriptors this process has open (Linux); 0 where it cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    except OSError:
        return 0


def _share(keep: int, held: int) -> int:
    """`keep`, or fewer under a low open-file limit (read at each open of a new shard: a process may
    lower it): an eighth of what the others leave free (held: what this set keeps itself), so that the
    ranks' sockets, the workers' pipes, the hash check of a shard and the other split keep the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return keep
    free = soft - max(0, _in_use() - held)
    return max(1, min(keep, free // 8))


class Descriptors:
    """Open read-only descriptors by path, at most `keep` of them, least recently used closed first.
    With each descriptor its `opened(fd)` result is kept (e.g. a shard's offset table) and dropped
    with it. Not shared between processes: a copy (a DataLoader worker's) starts empty."""

    def __init__(self, keep: Optional[int] = None):
        self.keep = keep or KEEP
        self._open: OrderedDict = OrderedDict()

    def get(self, path: Path, opened: Callable[[int], object] = lambda fd: None) -> tuple[int, object]:
        key = str(path)
        entry = self._open.get(key)
        if entry is not None:
            self._open.move_to_end(key)
            return entry
        keep = _share(self.keep, len(self._open))
        while len(self._open) >= keep:
            self._close(next(iter(self._open)))
        fd = self._open_fd(path)
        try:
            entry = (fd, opened(fd))
        except BaseException:
            os.close(fd)
            raise
        self._open[key] = entry
        return entry

    def _open_fd(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if not is_fd_limit(e):
                raise
            if not self._open:
                raise fd_limit_error(path, e) from None
        self.close()  # the limit is lower than our share assumed: give back what we keep, once
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if is_fd_limit(e):
                raise fd_limit_error(path, e) from None
            raise

    def forget(self, path: Path) -> None:
        """Close the descriptor of a file that changed (e.g. a decompressed copy made again)."""
        if str(path) in self._open:
            self._close(str(path))

    def _close(self, key: str) -> None:
        fd, _ = self._open.pop(key)
        try:
            os.close(fd)
        except OSError:
            pass

    def close(self) -> None:
        for key in list(self._open):
            self._close(key)

    def __len__(self) -> int:
        return len(self._open)

    def __getstate__(self):
        return {"keep": self.keep, "_open": OrderedDict()}

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the os module may be gone: the process closes them
            pass
