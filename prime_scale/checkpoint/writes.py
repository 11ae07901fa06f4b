"""What one rank writes during a save, and keeping a failed write from breaking the collectives.

DeepSpeed's save_checkpoint runs collectives of its own between its writes (a barrier, the tag check's
two all-reduces, the closing barrier). A write that raises on one rank would leave that rank out of
the remaining ones while the others wait in them: whatever that rank calls next (our error all-reduce)
is paired with another rank's barrier, a hang or garbage. So while DeepSpeed saves, its writes (all of
them go through its checkpoint engine's save/makedirs, plus rank 0's copy of the recovery script) are
recorded, and the first one that fails is kept instead of raised: the rank skips its remaining writes
but still takes part in every collective, and the save's error all-reduce follows on every rank.

The recorded paths are also what this rank hashes and flushes (its own writes, still in its page
cache, never another node's files over the network), and its bytes and seconds for the save's log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Optional


def as_write_error(error: BaseException, path) -> BaseException:
    """torch.save writes through PyTorchFileWriter and reports a failed open or write (EIO, a
    vanished directory) as a RuntimeError, never an OSError: name it as the write failure it is.
    Other exceptions (our own bugs) pass through unchanged."""
    if isinstance(error, OSError) or not isinstance(error, RuntimeError):
        return error
    wrapped = OSError(errno.EIO, f"{str(error).splitlines()[0] if str(error) else 'write failed'}",
                      None if path is None else str(path))
    wrapped.__cause__ = error
    return wrapped


class RankWrites:
    """The files this rank wrote into a checkpoint folder (relative paths), and its first failed write."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.paths: list[str] = []
        self.error: Optional[BaseException] = None
        self.started = time.monotonic()

    def wrote(self, path) -> None:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.folder))
        if not rel.startswith(os.pardir) and rel not in self.paths:
            self.paths.append(rel)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def raise_deferred(self) -> None:
        if self.error is not None:
            raise self.error

    def _guarded(self, write, path_of):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None  # a write already failed: the save is lost, only the collectives still matter
            try:
                result = write(*args, **kwargs)
            except Exception as e:  # kept for after DeepSpeed's collectives (raise_deferred)
                self.error = as_write_error(e, _safe_path(path_of, args, kwargs))
                return None
            path = path_of(*args, **kwargs)
            if path is not None:
                self.wrote(path)
            return result
        return guarded

    @contextlib.contextmanager
    def deepspeed_io(self, engine):
        """Within: the DeepSpeed engine's checkpoint writes are recorded, and a failing one is deferred."""
        ce = engine.checkpoint_engine
        patches = [
            (ce, "save", lambda state_dict=None, path=None: path),
            (ce, "makedirs", lambda *a, **k: None),
            (engine, "_copy_recovery_script", lambda save_path: None),  # rank 0, beside its ZeRO files
        ]
        undo = []
        for owner, name, path_of in patches:
            if not hasattr(owner, name):
                continue
            own = name in vars(owner)  # an instance attribute (a test's wrapper): put that back
            original = getattr(owner, name)
            undo.append((owner, name, own, original))
            setattr(owner, name, self._guarded(original, path_of))
        try:
            yield self
        finally:
            for owner, name, own, original in reversed(undo):
                if own:
                    setattr(owner, name, original)
                else:
                    delattr(owner, name)


def _safe_path(path_of, args, kwargs):
    try:
        return path_of(*args, **kwargs)
    except TypeError:
        return None
