"""`ensure_demo_corpus`: the embedded default data, built once, safe to call from every rank at once.

The first caller takes an exclusive lock on ROOT/.build.lock (flock: released by the kernel when
the process exits, so a crashed builder never leaves a stale lock) and builds what is missing;
the others block on the lock and then find the dataset complete. Each part is published by an
atomic rename, and the dataset's manifest is written last, so "manifest present" means complete.
No torch.distributed is needed: ranks on one machine share the file system and the lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Optional

from prime_scale.data.manifest import MANIFEST_NAME, read_manifest_file
from prime_scale.errors import UserError

DEFAULT_ROOT = "data/demo"
ROOT_ENV = "PRIME_SCALE_DEMO_DIR"  # where the demo lives when no root is passed


def _complete(dataset: Path) -> bool:
    if not (dataset / MANIFEST_NAME).is_file():
        return False
    try:
        read_manifest_file(dataset / MANIFEST_NAME)
    except UserError:
        return False
    return True


def ensure_demo_corpus(root: Optional[str | Path] = None, seq_len: int = 128, log=None) -> Path:
    """The prepared demo dataset directory for `seq_len`, built first if absent or incomplete."""
    from data_prep.demo import dataset_dir

    root = Path(root if root is not None else os.environ.get(ROOT_ENV, DEFAULT_ROOT))
    target = dataset_dir(root, seq_len)
    if _complete(target):
        return target
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".build.lock", "a+")
    except OSError as e:
        raise UserError(f"{root}: cannot create the demo corpus directory: {e.strerror}; set data.path, or "
                        f"{ROOT_ENV} to a writable directory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"demo: another process is building the demo corpus in {root}; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(target):
                from data_prep.demo import build_demo

                build_demo(root, seq_len, log=log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
