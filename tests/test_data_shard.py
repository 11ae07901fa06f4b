"""Sharding: text -> MDS / webdataset shards -> text, checked with the formats' own readers."""

import glob
import hashlib
import itertools
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import webdataset as wds

from data_prep.demo import demo_documents
from data_prep.readers import ReadOptions
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.cli import main as cli
from prime_scale.data import load_tokenizer, open_dataset
from prime_scale.data.streaming_compat import import_streaming
from prime_scale.data.tokenizer import ExternalTokenizer
from prime_scale.errors import UserError

SEQ = 64
EXTRA = ["short", "  spaces  and\ttabs\n", "unicode é 中文 😀", "x" * 3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardcorpus")
    texts = [t for _, t in itertools.islice(demo_documents(), 30)] + EXTRA
    with open(root / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer([str(root / "docs.jsonl")], root / "tok", 800, log=lambda m: None)
    return root, texts, tok


def is_val(text: str, fraction: float, seed: int = 0) -> bool:
    """The documented split rule, computed independently of data_prep."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") < int(fraction * 2 ** 64)


def prorated(text_bytes, stream_ids, dropped):
    """The documented bytes rule, in exact rationals: text bytes × kept ids / stream ids, rounded
    to the nearest integer, halves up."""
    return math.floor(Fraction(text_bytes * (stream_ids - dropped), stream_ids) + Fraction(1, 2))


def read_mds(out, split):
    ds = import_streaming().LocalDataset(local=str(out), split=split)
    return np.stack([ds[i]["tokens"] for i in range(len(ds))])


def read_wds(out, split):
    shards = sorted(glob.glob(str(out / split / "*.tar")))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(samples))]
    return np.stack([s["tokens.npy"] for s in samples])


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_round_trip_text_to_shards_to_text(tmp_path, corpus, fmt):
    root, texts, tok = corpus
    out = tmp_path / "ds"
    m = shard_corpus([str(root / "docs.jsonl")], tok, out,
                     ShardOptions(seq_len=SEQ, format=fmt, val_fraction=0.3, workers=2, shard_bytes=20_000,
                                  progress=False), log=lambda s: None)
    reader = read_mds if fmt == "mds" else read_wds
    assert m == {k: v for k, v in open_dataset(out).items() if k not in ("dataset_dir", "uri")}
    for split in ("train", "val"):
        docs = [t for t in texts if is_val(t, 0.3) == (split == "val")]
        expected = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in docs])
        seqs = reader(out, split)
        assert seqs.dtype == np.uint16 and seqs.shape[1] == SEQ
        assert (seqs[:, 0] == tok.bos_id).all() and (seqs[:, -1] == tok.eos_id).all()
        body = seqs[:, 1:-1].reshape(-1)
        # the token stream is exactly the tokenizer's output plus one EOS per document, tail dropped
        assert len(body) == len(expected) // (SEQ - 2) * (SEQ - 2)
        np.testing.assert_array_equal(body, expected[: len(body)])
        # and the text comes back: every document wholly inside the kept stream decodes to its source
        pieces = np.split(body, np.nonzero(body == tok.eos_id)[0] + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs[: len(pieces)]
        s = m["splits"][split]
        assert s["documents"] == len(docs) and s["sequences"] == len(seqs)
        assert s["tokens"] == len(expected) - len(docs)
        assert s["dropped_tokens"] == len(expected) - len(body)
        # bits-per-byte facts: the text's bytes with the dropped tail prorated, and every position's id
        assert s["bytes"] == prorated(sum(len(t.encode("utf-8")) for t in docs), len(expected), s["dropped_tokens"])
        np.testing.assert_array_equal(s["token_counts"], np.bincount(seqs.reshape(-1), minlength=800))
    assert all(m["splits"][s]["dropped_tokens"] > 0 for s in ("train", "val"))  # the proration is exercised
    assert m["tokenizer"]["hash"] == tok.hash and m["format"] == fmt and m["vocab_size"] == 800
    assert load_tokenizer(out).hash == tok.hash
    if fmt == "wds":
        assert len(m["splits"]["train"]["shards"]) > 1


def test_split_bytes_are_the_exact_utf8_size_when_nothing_is_dropped(tmp_path, corpus):
    root, texts, tok = corpus
    # a prefix of the corpus and a sequence length whose bodies the stream fills exactly
    for n in range(len(texts), 0, -1):
        stream = sum(len(tok.encode(t)) + 1 for t in texts[:n])
        body = next((d for d in range(40, 400) if stream % d == 0), None)
        if body and "中文" in "".join(texts[:n]):
            break
    else:
        pytest.fail("no prefix of the corpus packs exactly")
    with open(tmp_path / "exact.jsonl", "w") as f:
        for t in texts[:n]:
            f.write(json.dumps({"text": t}) + "\n")
    m = shard_corpus([str(tmp_path / "exact.jsonl")], tok, tmp_path / "ds",
                     ShardOptions(seq_len=body + 2, format="wds", workers=2, shard_bytes=20_000, progress=False),
                     log=lambda s: None)
    s = m["splits"]["train"]
    assert s["dropped_tokens"] == 0 and s["sequences"] == stream // body
    utf8 = sum(len(t.encode("utf-8")) for t in texts[:n])
    assert s["bytes"] == utf8 > sum(len(t) for t in texts[:n])  # bytes, not characters
    seqs = read_wds(tmp_path / "ds", "train")
    np.testing.assert_array_equal(s["token_counts"], np.bincount(seqs.reshape(-1), minlength=800))
    assert s["token_counts"][tok.bos_id] == s["sequences"] == s["token_counts"][tok.eos_id] - n
    assert '"token_counts": [' in (tmp_path / "ds" / "manifest.json").read_text()  # one line, not V


def test_sharding_is_deterministic_and_split_is_by_content(tmp_path, corpus):
    root, texts, tok = corpus
    opts = dict(seq_len=SEQ, val_fraction=0.3, progress=False)
    shard_corpus([str(root / "docs.jsonl")], tok, tmp_path / "a", ShardOptions(workers=1, **opts), log=lambda s: None)
    shard_corpus([str(root / "docs.jsonl")], tok, tmp_path / "b", ShardOptions(workers=2, **opts), log=lambda s: None)
    for f in sorted((tmp_path / "a").rglob("*.mds")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    # reversed input order: the same documents land in validation
    with open(tmp_path / "rev.jsonl", "w") as f:
        for t in reversed(texts):
            f.write(json.dumps({"text": t}) + "\n")
    shard_corpus([str(tmp_path / "rev.jsonl")], tok, tmp_path / "c", ShardOptions(workers=1, **opts), log=lambda s: None)
    val_docs = [t for t in texts if is_val(t, 0.3)]
    assert 0 < len(val_docs) < len(texts)
    body = read_mds(tmp_path / "c", "val")[:, 1:-1].reshape(-1)
    pieces = np.split(body, np.nonzero(body == tok.eos_id)[0] + 1)[:-1]
    assert len(pieces) >= 1
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == val_docs[::-1][: len(pieces)]


def test_failed_shard_leaves_nothing_that_looks_complete(tmp_path, corpus):
    root, texts, tok = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text((root / "docs.jsonl").read_text() + '{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:36: no field 'text'"):
        shard_corpus([str(bad)], tok, tmp_path / "out", ShardOptions(seq_len=SEQ, workers=2, progress=False))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output, no temp directory


def test_shard_errors(tmp_path, corpus):
    root, texts, tok = corpus
    src = [str(root / "docs.jsonl")]
    with pytest.raises(UserError, match="too small.*one sequence"):
        (tmp_path / "tiny.txt").write_text("just a few words")
        shard_corpus([str(tmp_path / "tiny.txt")], tok, tmp_path / "o", ShardOptions(seq_len=SEQ, progress=False))
    with pytest.raises(UserError, match="validation split got .*raise --val-fraction"):
        shard_corpus(src, tok, tmp_path / "o", ShardOptions(seq_len=SEQ, val_fraction=1e-9, progress=False))
    with pytest.raises(UserError, match="empty corpus"):
        (tmp_path / "e.txt").write_text("\n \n")
        shard_corpus([str(tmp_path / "e.txt")], tok, tmp_path / "o", ShardOptions(seq_len=SEQ, progress=False))
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        shard_corpus(src, tok, tmp_path / "exists", ShardOptions(seq_len=SEQ, progress=False))
    for opts, msg in [(dict(seq_len=2), "at least 3"), (dict(seq_len=SEQ, format="parquet"), "mds or wds"),
                      (dict(seq_len=SEQ, val_fraction=1.0), r"\[0, 1\)"),
                      (dict(seq_len=SEQ, format="wds", compression="zstd"), "MDS shards only")]:
        with pytest.raises(UserError, match=msg):
            shard_corpus(src, tok, tmp_path / "o", ShardOptions(progress=False, **opts))
    assert not (tmp_path / "o").exists()


def test_pretokenized_gpt2_ids(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50256, size=int(rng.integers(5, 300))).tolist() for _ in range(40)]
    with open(tmp_path / "ids.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"input_ids": d}) + "\n")
    gpt2 = ExternalTokenizer(50257, 50256, 50256, None, "gpt2")
    m = shard_corpus([str(tmp_path / "ids.jsonl")], gpt2, tmp_path / "ds", ShardOptions(seq_len=128, progress=False),
                     ReadOptions(ids_field="input_ids"), log=lambda s: None)
    assert (m["vocab_size"], m["dtype"], m["tokenizer"]["kind"]) == (50257, "uint16", "external")
    seqs = read_mds(tmp_path / "ds", "train")
    body = seqs[:, 1:-1].reshape(-1)
    expected = np.concatenate([d + [50256] for d in docs])
    np.testing.assert_array_equal(body, expected[: len(body)])
    assert m["splits"]["train"]["bytes"] is None  # no text: unknown, not guessed
    np.testing.assert_array_equal(m["splits"]["train"]["token_counts"], np.bincount(seqs.reshape(-1), minlength=50257))
    tok = load_tokenizer(tmp_path / "ds")
    assert isinstance(tok, ExternalTokenizer) and tok.hash == gpt2.hash
    with pytest.raises(UserError, match="cannot decode"):
        tok.decode([1])
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps({"input_ids": [3, 50257]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: token id 50257 is outside the vocabulary"):
        shard_corpus([str(tmp_path / "bad.jsonl")], gpt2, tmp_path / "x", ShardOptions(seq_len=16, progress=False),
                     ReadOptions(ids_field="input_ids"))


def test_cli_shard_and_inspect(tmp_path, corpus, capsys):
    root, texts, tok = corpus
    args = ["prep", "shard", "--input", str(root / "docs.jsonl"), "--tokenizer", str(root / "tok"),
            "--seq-len", str(SEQ), "--val-fraction", "0.3", "--no-progress"]
    assert cli(args + ["--format", "wds", "--out", str(tmp_path / "w")]) == 0
    assert cli(args + ["--compression", "zstd", "--shard-size", "16KB", "--out", str(tmp_path / "z")]) == 0
    assert open_dataset(tmp_path / "w")["format"] == "wds"
    assert list((tmp_path / "z" / "train").glob("*.mds.zstd"))
    capsys.readouterr()
    assert cli(["prep", "inspect", str(tmp_path / "w"), "--decode", "1"]) == 0
    shown = capsys.readouterr().out
    assert "wds, seq_len 64, vocab 800" in shown and "--- train[0]" in shown
    assert cli(args + ["--out", str(tmp_path / "w")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["prep", "shard", "--input", str(root / "docs.jsonl"), "--seq-len", "8", "--out", str(tmp_path / "n")]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
