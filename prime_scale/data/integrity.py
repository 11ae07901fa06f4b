"""The files of a prepared dataset against the sizes and content hashes recorded when it was prepared.

`prime-scale prep shard` lists every file of the dataset but the manifest in the manifest's `files`
(`{"path": "train/shard.00000.mds", "bytes": N, "sha256": HEX}`, paths relative to the dataset
directory, as in checkpoint manifests). Three checks use it, from cheap to thorough:

- when a source is built (the loader's construction, before any step): every shard of the split
  exists and has its recorded size (one stat each; MDS sizes come from index.json, which old
  manifests without `files` have too). A remote dataset's shards are checked where the local cache
  holds them: nothing is downloaded for the check.
- when a shard is first opened in a process: its content hash (sha256, sequential reads at ~1 GB/s
  with the CPU's SHA instructions, against a loader that reads tens of MB/s: bench/bench_data.py).
  Once per file per process, keyed on its size and mtime, so a file replaced meanwhile is hashed again.
- `prime-scale prep inspect --verify` (prime_scale/data/verify.py): every file, and each shard's
  largest token id against the vocabulary.

A manifest written before `files` existed has no hashes: the hash checks are unavailable (never
failed), the size check covers what index.json records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from prime_scale.errors import UserError

HASH = "sha256"  # the SHA extensions make it faster than blake2b on current x86 and Arm CPUs
RESTORE = "restore it from a copy of the dataset, or prepare the dataset again with `prime-scale prep shard`"
NO_HASHES = ("was prepared before prime-scale recorded shard hashes: verification unavailable (sizes and token "
             "ids are still checked); prepare the dataset again with `prime-scale prep shard` to record them")

# (path, size, mtime_ns) of the files whose hash this process has verified
_VERIFIED: set = set()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        # reads into one reused buffer (no allocation per chunk): ~25% faster than read() + update()
        return hashlib.file_digest(f, HASH).hexdigest()


def describe_files(root: Path, skip: tuple = ("manifest.json",)) -> list[dict]:
    """{path, bytes, sha256} of every file under root (paths relative to it, sorted), but `skip`."""
    root = Path(root)
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in skip:
                out.append({"path": rel, "bytes": (root / rel).stat().st_size, HASH: file_digest(root / rel)})
    return sorted(out, key=lambda e: e["path"])


def recorded_files(manifest: dict) -> Optional[dict]:
    """path -> its record, or None for a manifest prepared before files were recorded."""
    files = manifest.get("files")
    return None if files is None else {e["path"]: e for e in files}


def size_problem(path: Path, expected: Optional[int], where: str, noun: str = "shard file") -> Optional[str]:
    """What is wrong with a file's presence or size (None: present, and of the recorded size if known)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{noun} missing ({where} lists it{'' if expected is None else f', {expected:,} bytes'})"
    if expected is not None and size != expected:
        return f"{noun} is {size} bytes, but {where} records {expected}: it is truncated or damaged"
    return None


def hash_problem(path: Path, entry: dict, noun: str = "shard") -> Optional[str]:
    """What is wrong with a file's content (None: its hash is the recorded one). Each file is hashed
    at most once per process while its size and mtime stay the same."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{noun} file missing (the manifest lists it, {entry['bytes']:,} bytes)"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return None
    try:
        problem = content_problem(st.st_size, lambda: file_digest(path), entry, noun)
    except OSError as e:
        return f"{noun} file unreadable ({e.strerror})"
    if problem is None:
        _VERIFIED.add(key)
    return problem


def content_problem(size: int, digest, entry: dict, noun: str = "shard") -> Optional[str]:
    """A file of `size` bytes against its record; `digest()` gives its hash, computed only if the size is right."""
    if size != entry["bytes"]:
        return f"{noun} file is {size} bytes, but the manifest records {entry['bytes']}: it is truncated or damaged"
    found = digest()
    if found != entry[HASH]:
        return (f"content hash mismatch ({HASH} {found[:16]}…, the manifest records {entry[HASH][:16]}…): "
                f"the {noun} is damaged")
    return None


def damaged(path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; {RESTORE}")
