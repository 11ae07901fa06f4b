"""Data at cluster scale: shard files opened once and kept (not once per sample, a metadata storm on
Lustre/NFS), a bounded number of them open (more shards than the open-file limit read fine, and the
limit is named, never called damage), verification stamps of one node that another node sharing the
cache leaves alone, and compressed MDS shards that several nodes decompress at once."""

import builtins
import collections
import fcntl
import io
import itertools
import json
import os
import re
import resource
import shutil
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.demo import demo_documents
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.data import integrity, open_dataset
from prime_scale.data.format import TOKENS_FIELD
from prime_scale.data.sources import open_source
from prime_scale.errors import UserError

SEQ, V = 32, 500
FORMATS = ["mds", "wds"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    with open(root / "a.jsonl", "w") as f:
        for _, text in itertools.islice(demo_documents(), 8):
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_tokenizer([str(root / "a.jsonl")], root / "tok", V, log=lambda m: None)
    small = dict(seq_len=SEQ, val_fraction=0.2, progress=False, workers=1)
    # tiny shards: dozens per split, more than the lowered open-file limits below
    for name, opts in (("mds", dict(format="mds", shard_bytes=800)), ("wds", dict(format="wds", shard_bytes=12000)),
                       ("zst", dict(format="mds", compression="zstd", shard_bytes=4000))):
        shard_corpus([str(root / "a.jsonl")], tok, root / name, ShardOptions(**opts, **small), log=lambda s: None)
    return root


def mds_rows(raw: bytes) -> np.ndarray:
    """The samples of an MDS shard's bytes, read by hand: uint32 count, uint32 offsets[count + 1], rows."""
    n = int(np.frombuffer(raw, np.uint32, count=1)[0])
    begin = int(np.frombuffer(raw, np.uint32, count=1, offset=4)[0])
    return np.frombuffer(raw, np.uint16, count=n * SEQ, offset=begin).reshape(n, SEQ)


def stored_samples(ds: Path, fmt: str, split: str = "train") -> tuple[np.ndarray, list[Path]]:
    """Every sample of a split in stored order, and its shard files, read without prime-scale."""
    if fmt == "wds":
        files = [ds / split / s["file"] for s in open_dataset(ds)["splits"][split]["shards"]]
        rows = []
        for path in files:
            with tarfile.open(path) as tf:
                rows += [np.load(io.BytesIO(tf.extractfile(m).read())) for m in tf if m.name.endswith(f".{TOKENS_FIELD}.npy")]
        return np.stack(rows), files
    shards = json.loads((ds / split / "index.json").read_text())["shards"]
    if shards[0].get("zip_data"):
        files = [ds / split / s["zip_data"]["basename"] for s in shards]
        raws = [zstandard.ZstdDecompressor().decompress(p.read_bytes()) for p in files]
    else:
        files = [ds / split / s["raw_data"]["basename"] for s in shards]
        raws = [p.read_bytes() for p in files]
    return np.concatenate([mds_rows(r) for r in raws]), files


def read_all(src, order: np.ndarray) -> np.ndarray:
    """Every sample once, in `order`, 16 at a time (as micro-batches of a shuffled epoch)."""
    out = np.empty((order.size, SEQ), dtype=np.uint16)
    for start in range(0, order.size, 16):
        ids = order[start:start + 16]
        out[start:start + 16] = src.read(ids)
    return out[np.argsort(order)]


def lowest_free_fd() -> int:
    """RLIMIT_NOFILE bounds descriptor numbers: with the soft limit at this one, no open succeeds."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def open_shard_fds(files) -> int:
    names = {str(p) for p in files}
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") in names for fd in os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_split_read_at_random_opens_each_shard_file_at_most_twice(data, fmt, monkeypatch):
    """Once to hash it, once for the descriptor kept for its reads: not once per sample."""
    expected, files = stored_samples(data / fmt, fmt)
    src = open_source(open_dataset(data / fmt), "train")
    opened, real_open, real_os_open = collections.Counter(), builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.update([str(f)]) or real_open(f, *a, **k))
    monkeypatch.setattr(os, "open", lambda f, *a, **k: opened.update([str(f)]) or real_os_open(f, *a, **k))
    got = read_all(src, np.random.default_rng(0).permutation(len(src)))
    monkeypatch.undo()
    assert (got == expected).all()
    assert len(files) >= 20 and len(src) > 5 * len(files)
    per_shard = [opened[str(p)] for p in files]
    assert max(per_shard) <= 2, per_shard


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_shards_than_the_open_file_limit_are_read_without_error(data, fmt):
    expected, files = stored_samples(data / fmt, fmt)
    m = open_dataset(data / fmt)
    open_source(m, "train").read(np.arange(1))  # the format library imported before the limit is lowered
    src = open_source(m, "train")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit, kept_before = lowest_free_fd() + 12, open_shard_fds(files)
    assert len(files) > 12 + 8
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        got = read_all(src, np.random.default_rng(1).permutation(len(src)))
        kept = open_shard_fds(files) - kept_before
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (got == expected).all()
    assert 1 <= kept <= 8, kept


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exhausted_open_file_limit_is_named_not_reported_as_damage(data, fmt):
    m = open_dataset(data / fmt)
    open_source(m, "train").read(np.arange(1))
    src = open_source(m, "train")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))  # not one more
    try:
        with pytest.raises(UserError) as err:
            src.read(np.arange(1))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    msg = str(err.value)
    assert "too many open files" in msg and "RLIMIT_NOFILE" in msg and "ulimit -n" in msg, msg
    assert "is not damaged" in msg and "restore it" not in msg, msg


def settled(path: Path) -> None:
    """Wait until a file's last change is old enough for a stamp (integrity._settled)."""
    time.sleep(max(0.0, path.stat().st_ctime + 1.1 - time.time()))


def test_two_nodes_sharing_a_cache_keep_each_others_stamps(data, tmp_path, monkeypatch):
    """Each node hashes a shard once per boot; a second node (another host and boot id, the same
    $PRIME_SCALE_CACHE on a shared $HOME) neither voids the first one's stamp nor waits on its lock."""
    import socket

    monkeypatch.setenv("PRIME_SCALE_CACHE", str(tmp_path / "cache"))
    ds = data / "mds"
    shard = ds / "train" / json.loads((ds / "train" / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    entry = next(e for e in open_dataset(ds)["files"] if e["path"] == f"train/{shard.name}")
    settled(shard)
    hashed, real = [], integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda path: hashed.append(path) or real(path))

    def on(node: str):  # a process of that node: its own host name and boot id, nothing verified yet
        monkeypatch.setattr(socket, "gethostname", lambda: f"host-{node}")
        monkeypatch.setattr(integrity, "_boot_id", lambda: f"boot-{node}")
        integrity._VERIFIED.clear()

    for node, hashes in (("a", 1), ("b", 2), ("a", 2), ("b", 2), ("a", 2)):
        on(node)
        assert integrity.hash_problem(shard, entry) is None and len(hashed) == hashes, (node, hashed)
    on("a")
    stamp_a = integrity._Stamp(shard, shard.stat(), entry["sha256"])
    with stamp_a.locked():  # node a hashing it now: node b is not held up
        on("b")
        lock_b = integrity._Stamp(shard, shard.stat(), entry["sha256"]).path.with_suffix(".lock")
        fd = os.open(lock_b, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_a_stale_decompressed_copy_of_the_right_size_is_made_again(data, tmp_path):
    """A decompressed copy left from other shards (a dataset prepared again: same sample count,
    same size) is not trusted for its size."""
    ds = tmp_path / "zst"
    shutil.copytree(data / "zst", ds)
    expected, zipped = stored_samples(ds, "mds")
    src = open_source(open_dataset(ds), "train")
    first = json.loads((ds / "train" / "index.json").read_text())["shards"][0]
    raw = ds / "train" / first["raw_data"]["basename"]
    body = zstandard.ZstdDecompressor().decompress(zipped[0].read_bytes())
    rows = mds_rows(body)
    begin = len(body) - rows.nbytes
    raw.write_bytes(body[:begin] + rows[::-1].tobytes())  # the right size, other samples
    got = src.read(np.arange(first["samples"]))
    assert (got == expected[: first["samples"]]).all()


def test_two_nodes_decompressing_a_shard_at_once_make_one_correct_copy(data, tmp_path, monkeypatch):
    """Two "nodes" (two sources reading the same shared dataset at the same moment, one process id:
    containers often give every rank the same) decompress each shard once between them, publish it
    whole, and leave no temporary file."""
    from prime_scale.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base import compression

    ds = tmp_path / "zst"
    shutil.copytree(data / "zst", ds)
    expected, zipped = stored_samples(ds, "mds")
    calls, real = [], compression.decompress

    def slow_decompress(algo, data):  # a large shard: the other node arrives while this one works
        calls.append(len(data))
        time.sleep(0.05)
        return real(algo, data)
    monkeypatch.setattr(compression, "decompress", slow_decompress)
    m = open_dataset(ds)
    nodes = [open_source(m, "train"), open_source(m, "train")]
    n = sum(s["samples"] for s in json.loads((ds / "train" / "index.json").read_text())["shards"][:3])
    start, results, errors = threading.Barrier(2), [None, None], []

    def node(i):
        try:
            start.wait()
            results[i] = nodes[i].read(np.arange(n))  # the first three shards
        except Exception as e:  # reported below, with the other node's outcome
            errors.append(e)
    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all((r == expected[:n]).all() for r in results)
    assert len(calls) == 3, calls  # one decompression per shard, not one per node
    left = [p.name for p in (ds / "train").iterdir() if re.search(r"tmp|part", p.name)]
    assert not left, left
