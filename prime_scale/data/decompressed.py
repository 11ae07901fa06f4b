"""The decompressed copy of a compressed MDS shard, made once for all the nodes that read it.

mosaicml-streaming's MDS reader reads raw shards, so a compressed shard (`prep shard --compression`)
is decompressed beside itself, in the dataset directory, which on a cluster every node shares:

- the first process to need it takes a file lock beside it (`.NAME.lock`; where the file system
  offers no locks, every process goes on alone), decompresses the verified compressed shard, and
  publishes the copy atomically under a temp name unique across hosts (host, pid, random), with a
  record `.NAME.made-from.json`: the compressed shard it came from (its manifest hash) and the copy's
  size and sha256. Processes that waited on the lock, or arrive later on any node, use that copy.
- a copy is trusted only with a record that names this compressed shard and matches its size and
  hash (hashed once per node boot, as any shard: integrity.hash_problem), or the sha256 of the raw
  data where index.json records one: a copy of the right size left by another preparation of the
  dataset, or one cut short, is made again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Optional

from prime_scale.data.integrity import HASH, damaged, hash_problem
from prime_scale.errors import UserError


def _unique_tmp(path: Path) -> Path:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(6)}")


def _publish(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a unique temp, fsynced, renamed into place."""
    tmp = _unique_tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _record_path(raw: Path) -> Path:
    return raw.with_name(f".{raw.name}.made-from.json")


def _expected_hash(info: dict, raw: Path, origin: str) -> Optional[str]:
    """The sha256 the raw copy must have: index.json's, else the record's if it names this origin."""
    index_hash = (info["raw_data"].get("hashes") or {}).get(HASH)
    if index_hash:
        return index_hash
    try:
        record = json.loads(_record_path(raw).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("from") == origin and record.get("bytes") == info["raw_data"]["bytes"]
    return record.get(HASH) if ok else None


def _intact(info: dict, raw: Path, origin: str) -> bool:
    expected = _expected_hash(info, raw, origin)
    if expected is None or not raw.exists():
        return False
    return hash_problem(raw, {"bytes": info["raw_data"]["bytes"], HASH: expected}, "decompressed shard") is None


@contextlib.contextmanager
def _locked(raw: Path):
    """An exclusive lock beside the copy, so that the processes of every node that share the directory
    decompress it once; quiet where the file system has no locks (each process then works alone)."""
    fd = None
    try:
        fd = os.open(raw.with_name(f".{raw.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def ensure_raw(info: dict, zipped: Path, zipped_entry: Optional[dict]) -> Path:
    """The path of a compressed shard's intact decompressed copy, made if needed. `zipped` is already
    verified against `zipped_entry` (its manifest record; None for a manifest without hashes)."""
    raw = zipped.parent / info["raw_data"]["basename"]
    if zipped_entry and zipped_entry.get(HASH):
        origin = f"{HASH}:{zipped_entry[HASH]}"
    else:  # no hash to name the compressed shard by: its size and modification time
        st = zipped.stat()
        origin = f"stat:{st.st_size}:{st.st_mtime_ns}"
    if _intact(info, raw, origin):
        return raw
    with _locked(raw):
        if _intact(info, raw, origin):  # made by the process (of any node) that held the lock before us
            return raw
        _decompress_and_publish(info, zipped, raw, origin)
    return raw


def _decompress_and_publish(info: dict, zipped: Path, raw: Path, origin: str) -> None:
    from streaming.base.compression import decompress

    try:
        data = decompress(info["compression"], zipped.read_bytes())
    except Exception as e:  # each codec raises its own types; a shard that does not decompress is damaged
        raise damaged(zipped, f"cannot decompress the shard ({type(e).__name__}: {e})") from None
    size, digest = info["raw_data"]["bytes"], hashlib.new(HASH, data).hexdigest()
    if len(data) != size:
        raise damaged(zipped, f"decompresses to {len(data)} bytes, but index.json records {size}")
    index_hash = (info["raw_data"].get("hashes") or {}).get(HASH)
    if index_hash and digest != index_hash:
        raise damaged(zipped, f"decompresses to content of {HASH} {digest[:16]}…, index.json records "
                              f"{index_hash[:16]}…")
    try:
        _publish(raw, data)
        _publish(_record_path(raw), json.dumps({"from": origin, "bytes": size, HASH: digest}).encode())
    except OSError as e:
        raise UserError(f"{raw}: cannot write the decompressed copy of {zipped.name} ({e.strerror}): compressed MDS "
                        "shards are decompressed beside themselves, so their directory must be writable (and have "
                        "room for the raw shards); make it so, or prepare the dataset without --compression") from None
