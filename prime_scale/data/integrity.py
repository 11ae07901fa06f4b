"""The files of a prepared dataset against the sizes and content hashes recorded when it was prepared.

`prime-scale prep shard` lists every file of the dataset but the manifest in the manifest's `files`
(`{"path": "train/shard.00000.mds", "bytes": N, "sha256": HEX}`, paths relative to the dataset
directory, as in checkpoint manifests). Three checks use it, from cheap to thorough:

- when a source is built (the loader's construction, before any step): every shard of the split
  exists and has its recorded size (one stat each; MDS sizes come from index.json, which old
  manifests without `files` have too). A remote dataset's shards are checked where the local cache
  holds them: nothing is downloaded for the check.
- when a shard is first opened: its content hash (sha256, sequential reads at ~1 GB/s with the CPU's
  SHA instructions, against a loader that reads tens of MB/s: bench/bench_data.py). Once per file
  per *machine boot*: a verified file gets a stamp under the cache ($PRIME_SCALE_CACHE, else
  ~/.cache/prime-scale, in verified/HOST-ID/, one folder per host name and boot id) holding its identity — device, inode, size, mtime and ctime
  (which no user can set back, so any write to the file invalidates it) — the boot and the hash it
  matched; a file changed less than a second before its hash gets no stamp (file times tick
  coarsely, so a write in the same tick would go unseen). The R ranks × W loader workers of a machine would otherwise each read and hash every
  shard they open; a file lock per stamp makes the first of them hash while the others wait and
  reuse its result. Stamps and locks are node-local even when the cache is not (a $HOME shared by
  the cluster): the nodes of a job neither void each other's stamps nor queue on one lock per shard.
  A stamp never vouches for a hash other than the one the manifest records. Decay
  of the medium after verification (no write, so no new ctime) is found by `prep inspect --verify`
  or after the next boot. Without a writable cache, each process hashes as before.
- `prime-scale prep inspect --verify` (prime_scale/data/verify.py): every file, and each shard's
  largest token id against the vocabulary.

A manifest written before `files` existed has no hashes: the hash checks are unavailable (never
failed), the size check covers what index.json records.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

from prime_scale.data.descriptors import fd_limit_error, is_fd_limit
from prime_scale.data.remote import cache_root
from prime_scale.errors import UserError

HASH = "sha256"  # the SHA extensions make it faster than blake2b on current x86 and Arm CPUs
RESTORE = "restore it from a copy of the dataset, or prepare the dataset again with `prime-scale prep shard`"
NO_HASHES = ("was prepared before prime-scale recorded shard hashes: verification unavailable (sizes and token "
             "ids are still checked); prepare the dataset again with `prime-scale prep shard` to record them")

SETTLED_NS = 1_000_000_000  # see _settled
# (path, size, mtime_ns, ctime_ns) of the files whose hash this process has verified
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
    at most once per machine boot while it stays unwritten (see the module's docstring)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{noun} file missing (the manifest lists it, {entry['bytes']:,} bytes)"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _VERIFIED:
        return None
    stamp = _Stamp(path, st, entry.get(HASH))
    if stamp.valid():  # this file, unchanged since a process of this boot hashed it
        _VERIFIED.add(key)
        return None
    with stamp.locked():
        if stamp.valid():  # hashed by the process that held the lock before us
            _VERIFIED.add(key)
            return None
        try:
            problem = content_problem(st.st_size, lambda: file_digest(path), entry, noun)
        except OSError as e:
            if is_fd_limit(e):  # the process's limit, not the file: named as such (descriptors.py)
                raise fd_limit_error(path, e) from None
            return f"{noun} file unreadable ({e.strerror})"
        if problem is None and _settled(st):
            _VERIFIED.add(key)
            stamp.write()
    return problem


def _settled(st: os.stat_result) -> bool:
    """The file's last change is older than a margin. File times come from a coarse clock (a few ms
    per tick): a write in the same tick as the hash would leave size, mtime and ctime unchanged. So a
    file changed within the margin is vouched for by no record (git's "racily clean" rule), and is
    hashed again at its next open."""
    return time.time_ns() - st.st_ctime_ns > SETTLED_NS


@functools.cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: stamps last across boots
        return ""


def _node() -> str:
    """This machine among those that share the cache: its host name and boot id (a folder name)."""
    host = socket.gethostname()
    key = hashlib.sha256(f"{host}\0{_boot_id()}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', host)[:64]}-{key}"


class _Stamp:
    """The record that a file of this identity matched `sha256` on this machine since it booted, in
    the machine's own folder of the cache (other nodes sharing it have theirs). Every failure to read, lock or write one is quiet: the file is then simply hashed."""

    def __init__(self, path: Path, st: os.stat_result, sha256: Optional[str]):
        real = os.path.realpath(path)
        self.path = cache_root() / "verified" / _node() / hashlib.sha256(real.encode()).hexdigest()[:40]
        self.record = {"path": real, "dev": st.st_dev, "ino": st.st_ino, "bytes": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "boot": _boot_id(), HASH: sha256}

    def valid(self) -> bool:
        try:
            return self.record[HASH] is not None and json.loads(self.path.read_text()) == self.record
        except (OSError, ValueError):
            return False

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{os.urandom(4).hex()}")
        try:
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on this stamp (released when the holder exits, even by kill -9), so that
        the processes of one machine that open the same shard at once hash it once (the lock file is in
        the machine's folder: other nodes hash their copy of the work without waiting on this one)."""
        fd = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no cache to share through: hash without it
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)


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
