"""Damaged data is named before it trains: deleted and truncated shards when the loader is built,
changed bytes when a shard is first opened (content hashes, and the token-id check where a manifest
has no hashes), `prep inspect --verify`, truncated compressed inputs at prep time, and a manifest
whose vocabulary is smaller than the ids its shards hold."""

import bz2
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.demo import demo_documents
from data_prep.readers import ReadOptions, iter_documents
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.cli import main as cli
from prime_scale.config import load_recipe
from prime_scale.data import build_loader, open_dataset
from prime_scale.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SEQ, V = 32, 500
FORMATS = ["mds", "wds"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with open(root / "a.jsonl", "w") as f:
        for _, text in itertools.islice(demo_documents(), 16):
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_tokenizer([str(root / "a.jsonl")], root / "tok", V, log=lambda m: None)
    # 12 KB shards: several per split, each large enough to be cut to 4000 bytes
    small = dict(seq_len=SEQ, val_fraction=0.2, shard_bytes=12000, progress=False, workers=1)
    for fmt in FORMATS:
        shard_corpus([str(root / "a.jsonl")], tok, root / fmt, ShardOptions(format=fmt, **small), log=lambda s: None)
    shard_corpus([str(root / "a.jsonl")], tok, root / "zst", ShardOptions(format="mds", compression="zstd", **small),
                 log=lambda s: None)
    return root


def copy_of(data, tmp_path, fmt, split="train"):
    """A private copy of a prepared dataset and its split's shard files, in stored order."""
    ds = tmp_path / fmt
    shutil.copytree(data / fmt, ds)
    if fmt == "mds":
        names = [s["raw_data"]["basename"] for s in json.loads((ds / split / "index.json").read_text())["shards"]]
    else:
        names = [s["file"] for s in open_dataset(ds)["splits"][split]["shards"]]
    assert len(names) >= (4 if split == "train" else 1)
    return ds, [ds / split / n for n in names]


def cfg_for(path, *overrides, workers=0):
    return load_recipe(None, [f"data.path={path}", f"model.seq_len={SEQ}", f"data.num_workers={workers}",
                              *overrides])


def first_batches(path, n=1, workers=0, split="train"):
    """Read n micro-batches in stored order, so the first one comes from the split's first shard."""
    loader = build_loader(cfg_for(path, "data.shuffle=false", workers=workers), split, 0, 1, 4, seed=0)
    return list(itertools.islice(iter(loader), n))


def scribble(shard: Path, fmt: str) -> None:
    """Random bytes over the sample area of a shard, its size and its format's framing unchanged."""
    rng = np.random.default_rng(0)
    with open(shard, "r+b") as f:
        if fmt == "mds":  # uint32 count, uint32 offsets[count + 1], then the samples
            count = int(np.frombuffer(f.read(4), np.uint32)[0])
            begin, end = np.frombuffer(f.read(4 * (count + 1)), np.uint32)[[0, -1]]
            spans = [(int(begin), int(end - begin))]
        else:  # the array bytes at the end of each tar member's .npy payload
            with tarfile.open(shard) as tf:
                spans = [(m.offset_data + m.size - 2 * SEQ, 2 * SEQ) for m in tf if m.isfile()]
        for offset, size in spans:
            f.seek(offset)
            f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def edit_manifest(ds: Path, change) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    change(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def esc(path) -> str:
    return re.escape(str(path))


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_deleted_shard_is_named_when_the_loader_is_built(data, tmp_path, fmt):
    ds, shards = copy_of(data, tmp_path, fmt)
    shards[2].unlink()
    with pytest.raises(UserError, match=rf"^{esc(shards[2])}: shard file missing .*restore it .*prepare the "
                                        r"dataset again with `prime-scale prep shard`"):
        build_loader(cfg_for(ds), "train", 0, 1, 4, seed=0)
    _, val = copy_of(data, tmp_path / "v", fmt, "val")
    val[-1].unlink()  # a held-out split is checked as early: before an evaluation reads anything
    with pytest.raises(UserError, match=rf"^{esc(val[-1])}: shard file missing"):
        build_loader(cfg_for(tmp_path / "v" / fmt), "val", 0, 1, 4, seed=0, single_pass=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cut", ["4000 bytes", "half"])
def test_a_truncated_shard_is_named_when_the_loader_is_built(data, tmp_path, fmt, cut):
    ds, shards = copy_of(data, tmp_path, fmt)
    size = shards[1].stat().st_size
    left = 4000 if cut == "4000 bytes" else size // 2
    os.truncate(shards[1], left)
    with pytest.raises(UserError, match=rf"^{esc(shards[1])}: shard file is {left} bytes, but .* records {size}: "
                                        r"it is truncated or damaged; restore it"):
        build_loader(cfg_for(ds), "train", 0, 1, 4, seed=0)


# --------------------------------------------------------------------------- first open


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_bytes_over_the_samples_fail_the_hash_when_the_shard_is_first_opened(data, tmp_path, fmt):
    ds, shards = copy_of(data, tmp_path, fmt)
    scribble(shards[0], fmt)
    assert first_batches(data / fmt)[0]["input_ids"].max() < V  # the good copy reads
    # a worker process: its error reaches the caller as the message itself, not a worker traceback
    with pytest.raises(UserError, match=rf"^{esc(shards[0])}: content hash mismatch \(sha256 [0-9a-f]+…, the "
                                        r"manifest records [0-9a-f]+…\): the shard is damaged; restore it"):
        first_batches(ds, workers=1)
    # a manifest without hashes (as written before they were recorded): the token-id check names it
    edit_manifest(ds, lambda m: m.pop("files"))
    with pytest.raises(UserError, match=rf"^{esc(ds)}, split train: sample \d+ in shard {esc(shards[0])} holds "
                                        rf"token id \d+, but the manifest's vocab_size is {V}"):
        first_batches(ds, workers=0)


def _entry(ds: Path, shard: Path) -> dict:
    files = json.loads((ds / "manifest.json").read_text())["files"]
    return next(e for e in files if e["path"] == shard.relative_to(ds).as_posix())


def test_a_shard_verified_on_this_machine_is_hashed_again_only_once_it_changes(data, tmp_path, monkeypatch):
    """The stamp of a verified shard spares the other processes of the machine the hash; any write to
    the file (here bytes flipped in place with size and mtime put back: only its ctime moves) voids it,
    and a stamp never vouches for a hash other than the manifest's."""
    from prime_scale.data import integrity

    monkeypatch.setenv("PRIME_SCALE_CACHE", str(tmp_path / "cache"))
    ds, shards = copy_of(data, tmp_path, "mds")
    entry, hashed, real = _entry(ds, shards[0]), [], integrity.file_digest
    time.sleep(1.1)  # settled: see integrity._settled
    monkeypatch.setattr(integrity, "file_digest", lambda path: hashed.append(path) or real(path))

    def another_process():
        integrity._VERIFIED.clear()
        return integrity.hash_problem(shards[0], entry)

    assert another_process() is None and len(hashed) == 1
    assert another_process() is None and len(hashed) == 1  # the stamp vouched
    assert len(list((tmp_path / "cache" / "verified").glob("*/*[!k]"))) == 1  # verified/NODE/stamp
    st = shards[0].stat()
    body = bytearray(shards[0].read_bytes())
    body[len(body) // 2] ^= 0xFF
    with open(shards[0], "r+b") as f:
        f.write(body)
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shards[0].stat().st_mtime_ns == st.st_mtime_ns and shards[0].stat().st_size == st.st_size
    assert "content hash mismatch" in another_process() and len(hashed) == 2
    body[len(body) // 2] ^= 0xFF
    shards[0].write_bytes(body)
    assert another_process() is None and len(hashed) == 3
    assert "content hash mismatch" in integrity.hash_problem(shards[0], {**entry, "sha256": "0" * 64})
    assert len(hashed) == 4  # a stamp for the true hash does not vouch for another


def test_a_file_changed_within_the_last_second_gets_no_stamp(data, tmp_path, monkeypatch):
    from prime_scale.data import integrity

    monkeypatch.setenv("PRIME_SCALE_CACHE", str(tmp_path / "cache"))
    ds, shards = copy_of(data, tmp_path, "mds")  # just written
    assert integrity.hash_problem(shards[0], _entry(ds, shards[0])) is None
    assert not list((tmp_path / "cache" / "verified").glob("*/*[!k]"))


def test_processes_that_open_a_shard_at_once_hash_it_once(data, tmp_path):
    ds, shards = copy_of(data, tmp_path, "mds")
    time.sleep(1.1)  # settled: see integrity._settled
    script = ("import json, sys; from pathlib import Path; from prime_scale.data import integrity as i\n"
              "real, n = i.file_digest, []\n"
              "i.file_digest = lambda p: n.append(p) or real(p)\n"
              "print(i.hash_problem(Path(sys.argv[1]), json.loads(sys.argv[2])), len(n))")
    env = dict(os.environ, PRIME_SCALE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(shards[0]), json.dumps(_entry(ds, shards[0]))],
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = sorted(p.communicate(timeout=120)[0].split() for p in procs)
    assert outputs == [["None", "0"]] * 3 + [["None", "1"]], outputs


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_damaged_after_it_was_opened_is_named_with_its_sample(data, tmp_path, fmt):
    ds, shards = copy_of(data, tmp_path, fmt)
    loader = build_loader(cfg_for(ds, "data.shuffle=false"), "train", 0, 1, 4, seed=0)
    batches = iter(loader)
    next(batches)  # shard 0 is open, its hash checked
    os.truncate(shards[0], 4000)  # as a failing disk or a concurrent copy would
    with pytest.raises(UserError, match=rf"^{esc(shards[0])}: cannot read sample \d+ \(\w+: .*\): the shard is "
                                        r"damaged; restore it"):
        for _ in range(100):
            next(batches)


def test_hashes_are_recorded_for_every_file_and_match(data):
    for fmt in FORMATS:
        m = open_dataset(data / fmt)
        files = {e["path"]: e for e in m["files"]}
        on_disk = {str(p.relative_to(data / fmt)) for p in (data / fmt).rglob("*") if p.is_file()}
        assert set(files) == on_disk - {"manifest.json"}
        for path, e in files.items():
            body = (data / fmt / path).read_bytes()
            assert e["bytes"] == len(body)
            assert e["sha256"] == hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------- prep inspect --verify


def verify(ds, capsys):
    capsys.readouterr()
    code = cli(["prep", "inspect", str(ds), "--verify", "--decode", "0"])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_verify_reports_each_damaged_shard(data, tmp_path, fmt, capsys):
    code, out = verify(data / fmt, capsys)
    assert code == 0 and "DAMAGED" not in out
    assert re.search(r"verify: all \d+ files intact \(sizes and sha256\)", out), out
    ds, shards = copy_of(data, tmp_path, fmt)
    shards[1].unlink()
    os.truncate(shards[2], 4000)
    scribble(shards[3], fmt)
    code, out = verify(ds, capsys)
    assert code == 2
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 3, out
    assert re.search(rf"DAMAGED {esc(shards[1])}: shard file missing", out)
    assert re.search(rf"DAMAGED {esc(shards[2])}: shard file is 4000 bytes", out)
    assert re.search(rf"DAMAGED {esc(shards[3])}: content hash mismatch", out)
    assert str(shards[0]) not in out
    assert re.search(r"verify: 3 of \d+ files damaged", out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_manifest_vocabulary_smaller_than_the_ids_is_named(data, tmp_path, fmt, capsys):
    ds, shards = copy_of(data, tmp_path, fmt)
    small = 60  # below most ids of every shard
    edit_manifest(ds, lambda m: m.update(vocab_size=small))
    with pytest.raises(UserError, match=rf"{esc(ds / 'manifest.json')}: splits.train.token_counts must be a list "
                                        rf"of vocab_size={small} counts"):
        open_dataset(ds)
    edit_manifest(ds, lambda m: [s.pop("token_counts") for s in m["splits"].values()])
    with pytest.raises(UserError, match=rf"^{esc(ds)}, split train: sample 0 in shard {esc(shards[0])} holds token "
                                        rf"id \d+, but the manifest's vocab_size is {small}"):
        first_batches(ds, workers=0)
    code, out = verify(ds, capsys)
    assert code == 2
    assert re.search(rf"DAMAGED {esc(shards[0])}: holds token id \d+ ≥ the manifest's vocab_size {small}", out)
    assert sum(line.startswith("DAMAGED") for line in out.splitlines()) == len(list(ds.glob("*/*.mds"))) + \
        len(list(ds.glob("*/*.tar")))


def test_inspect_verify_of_a_manifest_without_hashes_says_so(data, tmp_path, capsys):
    ds, _ = copy_of(data, tmp_path, "wds")
    edit_manifest(ds, lambda m: m.pop("files"))
    code, out = verify(ds, capsys)
    assert code == 0
    assert "verification unavailable" in out and "prepared before prime-scale recorded shard hashes" in out
    assert "DAMAGED" not in out


# --------------------------------------------------------------------------- compressed inputs at prep time

COMPRESS = {"zst": zstandard.ZstdCompressor().compress, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("ext", list(COMPRESS))
@pytest.mark.parametrize("keep", [0.02, 0.6, 0.97, -1])
def test_a_truncated_compressed_input_is_named(data, tmp_path, ext, keep):
    body = COMPRESS[ext]((data / "a.jsonl").read_bytes())
    bad = tmp_path / f"cut.jsonl.{ext}"
    bad.write_bytes(body[: len(body) - 1] if keep == -1 else body[: int(len(body) * keep)])
    with pytest.raises(UserError, match=rf"^{esc(bad)}: truncated or corrupt compressed stream .*: the file is "
                                        r"damaged or incompletely copied"):
        list(iter_documents([str(bad)], ReadOptions()))
    whole = tmp_path / f"whole.jsonl.{ext}"
    whole.write_bytes(body)
    assert len(list(iter_documents([str(whole)], ReadOptions()))) == 16


def test_zstd_inputs_of_several_frames_are_read_whole(tmp_path):
    one, two = (zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n") for t in ("a", "b"))
    (tmp_path / "two.jsonl.zst").write_bytes(one + two)
    assert [d.text for d in iter_documents([str(tmp_path / "two.jsonl.zst")], ReadOptions())] == ["a", "b"]


@pytest.mark.parametrize("ext", ["zst", "gz"])
def test_prep_shard_of_a_truncated_compressed_input_exits_2(data, tmp_path, ext):
    body = COMPRESS[ext]((data / "a.jsonl").read_bytes())
    bad = tmp_path / f"cut.jsonl.{ext}"
    bad.write_bytes(body[: int(len(body) * 0.6)])
    out = tmp_path / "ds"  # webdataset: the command needs no mosaicml-streaming import, seconds on a busy machine
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "prime_scale.cli", "prep", "shard", "--input", str(bad),
                           "--tokenizer", str(data / "tok"), "--seq-len", str(SEQ), "--out", str(out),
                           "--format", "wds", "--workers", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}: truncated or corrupt compressed stream" in proc.stderr
    assert "Traceback" not in proc.stderr and "empty corpus" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".ds*"))  # no partial dataset, published or not


# --------------------------------------------------------------------------- remote datasets


def test_a_remote_dataset_checks_its_cache_and_downloads_a_damaged_copy_again(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_SCALE_CACHE", str(tmp_path / "cache"))
    ds, shards = copy_of(data, tmp_path, "mds")
    uri = f"file://{ds}"
    good = first_batches(uri, 2)
    cache = next((tmp_path / "cache" / "datasets").iterdir())
    cached = cache / "train" / shards[0].name
    scribble(cached, "mds")  # the cached copy is damaged, the remote one is intact: downloaded again
    again = first_batches(uri, 2)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(good, again))
    shards[2].unlink()  # not in the cache: the start-up check downloads nothing; the first read names it
    build_loader(cfg_for(uri), "train", 0, 1, 4, seed=0)
    with pytest.raises(UserError, match=rf"^{re.escape(uri)}/train/{shards[2].name}: not found: the manifest "
                                        r"lists this file; restore it there"):
        first_batches(uri, 1000)
    scribble(shards[0], "mds")
    cached.unlink()
    with pytest.raises(UserError, match=rf"^{re.escape(uri)}/train/{shards[0].name}: content hash mismatch .* "
                                        r"\(downloaded twice\): restore the remote copy"):
        first_batches(uri)


# --------------------------------------------------------------------------- compressed MDS shards


def test_compressed_mds_shards_are_checked_as_stored(data, tmp_path, capsys):
    ds = tmp_path / "zst"
    shutil.copytree(data / "zst", ds)
    zipped = sorted((ds / "train").glob("*.mds.zstd"))
    code, out = verify(ds, capsys)  # the largest ids are found in the decompressed samples
    assert code == 0 and "verify: all" in out, out
    good = first_batches(ds, 2)
    raw = ds / "train" / zipped[0].name[: -len(".zstd")]  # the reader's decompressed copy
    os.truncate(raw, 100)  # not of the index's size: made again from the verified compressed shard
    again = first_batches(ds, 2)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(good, again))
    body = bytearray(zipped[0].read_bytes())
    body[len(body) // 2:] = np.random.default_rng(0).bytes(len(body) - len(body) // 2)
    zipped[0].write_bytes(bytes(body))
    raw.unlink()
    with pytest.raises(UserError, match=rf"^{esc(zipped[0])}: content hash mismatch"):
        first_batches(ds)
    edit_manifest(ds, lambda m: m.pop("files"))  # without hashes: the codec's own error, named
    with pytest.raises(UserError, match=rf"^{esc(zipped[0])}: cannot decompress the shard"):
        first_batches(ds)
    code, out = verify(ds, capsys)
    assert code == 2 and re.search(rf"DAMAGED {esc(zipped[0])}: cannot read the shard", out), out
