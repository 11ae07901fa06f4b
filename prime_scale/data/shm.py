"""Cleanup after crashed mosaicml-streaming users: stale /dev/shm segments and file locks.

prime-scale's own loader creates no shared-memory segments or lock files (it reads shards through
streaming's format layer, not through StreamingDataset). Code that does run a StreamingDataset
leaves segments named NNNNNN_<name> in /dev/shm and NNNNNN_*_filelock files in the temp dir when
it is killed (kill -9, OOM), and streaming's own clean_stale_shared_memory() is a collective that
does not always find them. This module removes exactly those files that no live process has
mapped or open, so it is safe to run while other jobs use streaming.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times", "resume",
          "epoch_shape", "epoch_data")
SHM_NAME = re.compile(r"^(\d{6})_(?:" + "|".join(_NAMES) + r")")
LOCK_NAME = re.compile(r"^(\d{6})_(?:barrier|cache)_filelock$")


def files_in_use() -> set[str]:
    """Paths that some live process has mapped or holds open."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        used.add(parts[5].strip().removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            pass
    return used


def stale_streaming_files(shm_dir: Path = SHM_DIR, tmp_dir: Path | None = None) -> list[Path]:
    """Streaming's shared-memory segments and lock files that nothing uses any more."""
    tmp_dir = Path(tmp_dir or tempfile.gettempdir())
    used = files_in_use()
    stale, live_prefixes = [], set()
    if shm_dir.is_dir():
        for name in sorted(os.listdir(shm_dir)):
            m = SHM_NAME.match(name)
            if not m:
                continue
            path = shm_dir / name
            if str(path) in used:
                live_prefixes.add(m.group(1))
            else:
                stale.append(path)
    if tmp_dir.is_dir():
        for name in sorted(os.listdir(tmp_dir)):
            m = LOCK_NAME.match(name)
            path = tmp_dir / name
            if m and m.group(1) not in live_prefixes and str(path) not in used:
                stale.append(path)
    return stale


def clean_stale(dry_run: bool = False, shm_dir: Path = SHM_DIR, tmp_dir: Path | None = None) -> list[Path]:
    removed = []
    for path in stale_streaming_files(shm_dir, tmp_dir):
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
        removed.append(path)
    return removed
