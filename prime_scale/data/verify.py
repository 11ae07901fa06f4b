"""`prime-scale prep inspect --verify`: every file of a prepared dataset against its manifest, and
every shard's token ids against the vocabulary.

Each file is read once (a remote dataset's are downloaded into the local cache first): its size and
sha256 are compared with the manifest's `files` (data/integrity.py), and a shard's largest token id
is found in the same bytes: MDS shards hold their samples as one array after a table of offsets,
which is checked to describe the index's samples; webdataset shards are read member by member. An
id ≥ vocab_size means the shards do not belong to this manifest (hashes cannot tell: the manifest
itself may be the changed file). Every damaged file is reported, not only the first.

A manifest written before `files` existed still gets the size check of MDS shards (index.json
records sizes), the sample counts and the token ids; it is said that hashes are unavailable.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prime_scale.data.descriptors import fd_limit_error, is_fd_limit
from prime_scale.data.format import TOKENS_FIELD, manifest_path
from prime_scale.data.integrity import (HASH, NO_HASHES, content_problem, file_digest, recorded_files,
                                        size_problem)
from prime_scale.data.remote import fetch, is_remote
from prime_scale.data.sources import Source, open_source
from prime_scale.errors import UserError


@dataclass
class Report:
    damaged: list = field(default_factory=list)  # "path: what is wrong", one per damaged file
    checked: int = 0  # files looked at
    hashed: bool = True  # False: the manifest records no hashes

    def summary(self, manifest: dict) -> str:
        lines = [] if self.hashed else [f"verify: {manifest_path(manifest)} {NO_HASHES}"]
        if self.damaged:
            lines.append(f"verify: {len(self.damaged)} of {self.checked} files damaged: restore them from a copy "
                         "of the dataset, or prepare it again with `prime-scale prep shard`")
        else:
            what = f"sizes and {HASH}" if self.hashed else "sizes and sample counts"
            lines.append(f"verify: all {self.checked} files intact ({what}), token ids < vocab_size "
                         f"{manifest['vocab_size']}")
        return "\n".join(lines)


def _mds_max_id(src: Source, shard: int, data: bytes) -> int:
    info = src._index["shards"][shard]
    if info.get("zip_data"):
        from prime_scale.data.streaming_compat import import_streaming

        import_streaming()
        from streaming.base.compression import decompress

        data = decompress(info["compression"], data)
    n, row = info["samples"], src.seq_len * src.dtype.itemsize
    # the MDS layout: uint32 sample count, uint32 offsets[count + 1], then the samples' bytes
    head = np.frombuffer(data, np.uint32, count=n + 2).astype(np.int64) if len(data) >= 4 * (n + 2) else None
    if head is None or head[0] != n or (np.diff(head[1:]) != row).any() or head[-1] != len(data):
        raise ValueError(f"its header does not describe the index's {n} samples of {row} bytes")
    return int(np.frombuffer(data, src.dtype, count=n * src.seq_len, offset=int(head[1])).max(initial=0))


def _wds_max_id(src: Source, shard: int, data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = [m for m in tf if m.isfile() and m.name.endswith(f".{TOKENS_FIELD}.npy")]
    expected = src._shards[shard]["samples"]
    if len(members) != expected:
        raise ValueError(f"it holds {len(members)} samples, the manifest says {expected}")
    view = memoryview(data)
    return max((int(np.load(io.BytesIO(view[m.offset_data:m.offset_data + m.size]), allow_pickle=False).max())
                for m in members), default=0)


def _shard_problem(src: Source, shard: int) -> str | None:
    rel = src.shard_file(shard)
    try:
        data = src._local(rel).read_bytes()  # a remote shard is downloaded first
    except UserError as e:
        return f"cannot download it ({e})"
    except OSError as e:
        if is_fd_limit(e):  # the process's open-file limit, not damage
            raise fd_limit_error(src.dir / rel, e) from None
        return f"shard file unreadable ({e.strerror})"
    entry = (src.files or {}).get(rel)
    if entry and (problem := content_problem(len(data), lambda: hashlib.new(HASH, data).hexdigest(), entry)):
        return problem
    try:
        top = (_mds_max_id if src.manifest["format"] == "mds" else _wds_max_id)(src, shard, data)
    except Exception as e:  # what a damaged shard makes its format's parser raise: tar, npy, codec errors
        return f"cannot read the shard ({type(e).__name__}: {e}): it is damaged"
    if top >= src.vocab_size:
        return (f"holds token id {top} ≥ the manifest's vocab_size {src.vocab_size}: the shard is damaged, or the "
                "shards do not match the manifest's vocabulary; prepare the dataset again with `prime-scale prep "
                "shard` (or restore the manifest written with these shards)")
    return None


def _split_problems(m: dict, split: str, report: Report) -> set:
    """Check the split's shards; returns their paths (relative to the dataset)."""
    try:
        src = open_source(m, split, check=False)
    except UserError as e:  # an unreadable index, or sample counts that disagree with the manifest
        report.checked += 1
        report.damaged.append(str(e))
        return {f"{split}/index.json"}
    seen, absent = set(), dict(src.presence_problems())
    for shard in range(len(src.shard_sizes)):
        rel = src.shard_file(shard)
        seen.add(rel)
        report.checked += 1
        path = src.dir / rel
        problem = absent.get(path) or _shard_problem(src, shard)
        if problem:
            report.damaged.append(f"{path}: {problem}")
    return seen


def verify_dataset(m: dict) -> Report:
    """Every damaged file of a dataset (whose manifest `m` is open_dataset's), and how many were checked."""
    files = recorded_files(m)
    report = Report(hashed=files is not None)
    seen = set()
    for split in m["splits"]:
        seen |= _split_problems(m, split, report)
    root = Path(m["dataset_dir"])
    for rel, entry in (files or {}).items():  # the rest: index files, the tokenizer
        if rel in seen:
            continue
        report.checked += 1
        try:
            path = fetch(m["uri"], rel, root) if is_remote(m["uri"]) else root / rel
        except UserError as e:
            report.damaged.append(f"{rel}: cannot download it ({e})")
            continue
        problem = size_problem(path, entry["bytes"], manifest_path(m), "file") or content_problem(
            path.stat().st_size, lambda: file_digest(path), entry, "file")
        if problem:
            report.damaged.append(f"{path}: {problem}")
    return report
