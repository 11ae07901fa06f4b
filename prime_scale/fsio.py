"""Publishing outputs atomically: readers see the old content or the new one, never a part.

One guarantee everywhere: the data is written to a private temporary name beside the target,
fsynced, renamed into place, and the directory entry is fsynced, so a crash (or power loss) at any
moment leaves the old file or directory, or the complete new one, plus at most a hidden temp.
A full disk (or quota) while publishing is a DiskFullError naming the file: exit 2, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from prime_scale.errors import UserError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError):
    """No space left (or a quota or file-size limit reached) while writing the output `path`."""

    def __init__(self, path: Union[str, Path], free: str, advice: str = "Free space, then run the command again"):
        self.path, self.free = Path(path), free
        super().__init__(f"no space left on the device writing {path} ({free}); it was not written (an earlier "
                         f"version, if any, is unchanged). {advice}")


def out_of_space(error: BaseException, near: Union[str, Path]) -> Optional[str]:
    """The free space near `near` when `error` is (or looks like) a full disk, else None. Some
    writers hide the errno: PIL raises ENOSPC while handling its own AttributeError (the chain is
    searched), torch reports a bare RuntimeError (a write failure with almost nothing free counts)."""
    try:
        free = shutil.disk_usage(near).free
    except OSError:
        free = None
    chain, seen = error, 0
    no_space = False
    while chain is not None and seen < 8 and not no_space:
        no_space = isinstance(chain, OSError) and chain.errno in NO_SPACE_ERRNOS
        chain, seen = chain.__cause__ or chain.__context__, seen + 1
    if no_space or (isinstance(error, (OSError, RuntimeError)) and free is not None and free < (64 << 20)):
        return f"{free / (1 << 20):.1f} MiB free" if free is not None else "free space unknown"
    return None


@contextlib.contextmanager
def disk_full_named(path: Union[str, Path]) -> Iterator[None]:
    """Turn a full disk while `path` is written into a DiskFullError that names it."""
    path = Path(path)
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        full = out_of_space(e, path.parent if path.parent.exists() else ".")
        if full is None:
            raise
        raise DiskFullError(path, full) from None


def _private_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Union[str, Path]) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write a file atomically and durably (text is written as UTF-8)."""
    path = Path(path)
    tmp = _private_name(path)
    with disk_full_named(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(path.parent)


def publish_file(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """`write(tmp)` creates the file at a temporary path (e.g. a plotting library's savefig); it is
    then fsynced and renamed into place. The temp keeps the target's suffix: writers pick a format by it."""
    path = Path(path)
    tmp = _private_name(path).with_suffix(path.suffix)
    with disk_full_named(path):
        try:
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(path.parent)


def publish_dir(out: Union[str, Path], build: Callable[[Path], None], overwrite: bool = False) -> None:
    """`build(tmp)` fills a temporary directory beside `out`; it is then renamed into place.

    A crash leaves only a hidden temp directory; `out` is absent, the old one, or the complete new
    one. An existing `out` is replaced only with overwrite=True (an empty directory always is)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_named(out):
        _publish_dir(out, build, overwrite)


def _publish_dir(out: Path, build: Callable[[Path], None], overwrite: bool) -> None:
    tmp = _private_name(out)
    tmp.mkdir()
    try:
        build(tmp)
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync_file(Path(root) / name)
        if out.exists() and (out.is_file() or any(out.iterdir())):
            if not overwrite:
                raise UserError(f"{out}: already exists; pass --overwrite to replace it")
            old = _private_name(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
