"""Split statistics for bits per byte and the unigram baseline: the manifest fields, their checks,
SplitStats against hand computations and real prepared data, the unknown cases, the demo corpus."""

import hashlib
import itertools
import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from data_prep.demo import DEMO_VAL_FRACTION, demo_documents, ensure_demo_corpus
from data_prep.readers import ReadOptions
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.config import load_recipe
from prime_scale.data import SplitStats, build_loader, load_tokenizer, open_dataset
from prime_scale.data.format import validate_manifest
from prime_scale.data.streaming_compat import import_streaming
from prime_scale.data.tokenizer import ExternalTokenizer
from prime_scale.errors import UserError

SEQ = 32
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two text datasets of one tokenizer (a: MDS, b: wds) and a pre-tokenized one."""
    root = tmp_path_factory.mktemp("stats")
    texts = [t for _, t in itertools.islice(demo_documents(), 20)]
    for name, part in [("a", texts[:12]), ("b", texts[12:])]:
        with open(root / f"{name}.jsonl", "w") as f:
            for t in part:
                f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer([str(root / "a.jsonl")], root / "tok", 400, log=lambda m: None)
    opts = dict(seq_len=SEQ, val_fraction=0.25, progress=False, workers=1, shard_bytes=8192)
    shard_corpus([str(root / "a.jsonl")], tok, root / "a", ShardOptions(format="mds", **opts), **QUIET)
    shard_corpus([str(root / "b.jsonl")], tok, root / "b", ShardOptions(format="wds", **opts), **QUIET)
    rng = np.random.default_rng(1)
    with open(root / "ids.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"ids": rng.integers(0, 90, size=int(rng.integers(5, 80))).tolist()}) + "\n")
    shard_corpus([str(root / "ids.jsonl")], ExternalTokenizer(100, 98, 99, None, "ext"), root / "ids",
                 ShardOptions(format="mds", **opts), ReadOptions(ids_field="ids"), **QUIET)
    return root


def manifest(name, V, seq_len, train_counts, val):
    """A hand-written manifest that passes validation; val = (bytes, sequences, token_counts)."""
    val_bytes, val_seqs, val_counts = val
    m = {"version": 1, "format": "mds", "vocab_size": V, "seq_len": seq_len, "dtype": "uint16",
         "tokenizer": {"kind": "external", "hash": "h", "bos_id": 0, "eos_id": 1}, "dataset_dir": name,
         "splits": {"train": {"documents": 1, "tokens": 1, "sequences": sum(train_counts) // seq_len,
                              "bytes": 1, "token_counts": train_counts},
                    "val": {"documents": 1, "tokens": 1, "sequences": val_seqs, "bytes": val_bytes,
                            "token_counts": val_counts}}}
    return validate_manifest(m, name)


def test_hand_computed_mixture():
    V = 4
    a = manifest("A", V, 5, [5, 3, 0, 2], (100, 4, [5, 5, 5, 5]))
    b = manifest("B", V, 5, [0, 0, 6, 4], (90, 3, [0, 5, 5, 5]))
    stats = SplitStats([a, b], "val", weights=[1, 3])
    assert stats.bytes_known and stats.unigram_known and stats.describe_unknown() is None
    assert stats.total_bytes == 190
    got = stats.sequence_bytes(torch.tensor([0, 3, 4, 6, 2]))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([25.0, 25, 30, 30, 25], dtype=torch.float64))
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        stats.sequence_bytes(torch.tensor([7]))
    # p_A = (c + 1) / (10 + 4) = [6, 4, 1, 3] / 14, p_B = [1, 1, 7, 5] / 14; mixed 1 : 3
    expected = np.log(np.array([9, 7, 22, 18]) / 56)
    log_p = stats.unigram_log_probs()
    assert log_p.dtype == torch.float64 and log_p.shape == (V,)
    np.testing.assert_allclose(log_p.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(SplitStats([b], "val").unigram_log_probs().numpy(), np.log([1 / 14, 1 / 14, 0.5, 5 / 14]))
    with pytest.raises(UserError, match="weights"):
        SplitStats([a, b], "val", weights=[1])
    with pytest.raises(UserError, match="no 'test' split"):
        SplitStats([a], "test")


def reference_rows(path, split):
    ds = import_streaming().LocalDataset(local=str(path), split=split)
    return np.stack([ds[i]["tokens"] for i in range(len(ds))]).astype(np.int64)


def test_real_mixture_through_the_loader(data):
    a, b = open_dataset(data / "a"), open_dataset(data / "b")
    cfg = load_recipe(None, [f"model.seq_len={SEQ}", "data.num_workers=0",
                             f"data.mixture=[{{path: '{data / 'a'}', weight: 1}}, {{path: '{data / 'b'}', weight: 3}}]"])
    loader = build_loader(cfg, "val", 0, 2, 8, seed=0)
    stats = SplitStats.for_loader(loader)
    na, va, vb = a["splits"]["val"]["sequences"], a["splits"]["val"], b["splits"]["val"]
    credited = torch.zeros((), dtype=torch.float64)
    for batch in loader:
        per_seq = stats.sequence_bytes(batch["index"])
        expected = np.where(batch["index"].numpy() < na, va["bytes"] / na, vb["bytes"] / vb["sequences"])
        np.testing.assert_allclose(per_seq.numpy(), expected, rtol=1e-12)
        credited += per_seq[batch["valid"]].sum()
    credited += sum(stats.sequence_bytes(b["index"])[b["valid"]].sum() for b in build_loader(cfg, "val", 1, 2, 8, 0))
    # a whole pass over the split (both ranks, padding excluded) credits exactly the split's bytes
    assert stats.total_bytes == va["bytes"] + vb["bytes"]
    assert math.isclose(float(credited), stats.total_bytes, rel_tol=1e-12)
    # the unigram mixture, from counts of the training samples read independently of the manifests
    V = a["vocab_size"]
    counts_a = np.bincount(reference_rows(data / "a", "train").reshape(-1), minlength=V)
    counts_b = np.array(b["splits"]["train"]["token_counts"])  # checked against the shards in the loader tests
    mix = 0.25 * (counts_a + 1) / (counts_a.sum() + V) + 0.75 * (counts_b + 1) / (counts_b.sum() + V)
    np.testing.assert_allclose(stats.unigram_log_probs().numpy(), np.log(mix), rtol=1e-12)


def test_pretokenized_data_has_no_bytes(data):
    m = open_dataset(data / "ids")
    assert m["splits"]["train"]["bytes"] is None and m["splits"]["val"]["bytes"] is None
    stats = SplitStats([m], "val")
    assert not stats.bytes_known and stats.total_bytes is None and stats.unigram_known
    assert torch.isnan(stats.sequence_bytes(torch.arange(3))).all()
    assert stats.unigram_log_probs().shape == (100,)
    msg = stats.describe_unknown("bytes")
    assert msg == stats.describe_unknown() and "\n" not in msg
    assert msg.startswith(f"{data / 'ids' / 'manifest.json'}: prepared from pre-tokenized ids")
    assert "no bits per byte" in msg and stats.describe_unknown("unigram") is None


def test_a_manifest_from_before_the_fields_is_valid_and_reports_unknown(data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(data / "a", old)
    m = json.loads((old / "manifest.json").read_text())
    for split in m["splits"].values():
        del split["bytes"], split["token_counts"]
    (old / "manifest.json").write_text(json.dumps(m))
    where = old / "manifest.json"
    stats = SplitStats([open_dataset(old)], "val")
    assert not stats.bytes_known and not stats.unigram_known and stats.unigram_log_probs() is None
    assert stats.describe_unknown("bytes") == (f"{where}: prepared before prime-scale recorded split bytes; re-run "
                                               "`prime-scale prep shard` to get bits per byte")
    assert stats.describe_unknown() == (f"{where}: prepared before prime-scale recorded split bytes and token counts; "
                                        "re-run `prime-scale prep shard` to get bits per byte and the unigram baseline")
    # in a mixture, only the old dataset's sequences are unknown
    new = open_dataset(data / "b")
    mixed = SplitStats([new, open_dataset(old)], "val", [1, 1])
    nb = new["splits"]["val"]["sequences"]
    got = mixed.sequence_bytes(torch.tensor([0, nb]))
    assert got[0] == new["splits"]["val"]["bytes"] / nb and torch.isnan(got[1])
    assert not mixed.bytes_known and mixed.unigram_log_probs() is None
    assert str(data / "b") not in mixed.describe_unknown()


@pytest.mark.parametrize("key, value, message", [
    ("bytes", -1, r"splits\.val\.bytes must be a non-negative integer or null, got -1"),
    ("bytes", "12", r"splits\.val\.bytes must be a non-negative integer or null, got '12'"),
    ("bytes", True, r"splits\.val\.bytes must be .* got True"),
    ("token_counts", [1, 2], r"splits\.val\.token_counts must be a list of vocab_size=400 counts, got a list of 2"),
    ("token_counts", {"0": 1}, r"splits\.val\.token_counts must be a list .* got dict"),
    ("token_counts", "neg", r"splits\.val\.token_counts\[5\] is -1, not a non-negative integer"),
    ("token_counts", "float", r"splits\.val\.token_counts\[5\] is 1\.5, not a non-negative integer"),
    ("token_counts", "sum", r"splits\.val\.token_counts sums to \d+, but \d+ sequences of 32 hold \d+ ids"),
])
def test_bad_field_values_name_the_manifest_and_key(data, tmp_path, key, value, message):
    m = json.loads((data / "a" / "manifest.json").read_text())
    if isinstance(value, str) and key == "token_counts":
        counts = m["splits"]["val"]["token_counts"]
        counts[5] = {"neg": -1, "float": 1.5, "sum": counts[5] + 1}[value]
    else:
        m["splits"]["val"][key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=rf"{tmp_path / 'manifest.json'}: {message}.*prep shard"):
        open_dataset(tmp_path)


def is_val(text: str) -> bool:
    """The documented split rule (seed 0), computed independently of data_prep."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=(0).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") < int(DEMO_VAL_FRACTION * 2 ** 64)


def test_demo_records_the_facts_and_an_old_demo_is_rebuilt():
    path = ensure_demo_corpus(log=lambda s: None)
    m = open_dataset(path)
    texts = [json.loads(line)["text"] for line in (path.parent / "corpus.jsonl").read_text().splitlines()]
    val = [t for t in texts if is_val(t)]
    tok = load_tokenizer(path)
    s = m["splits"]["val"]
    stream = sum(len(tok.encode(t)) + 1 for t in val)
    assert (s["documents"], s["tokens"] + s["documents"]) == (len(val), stream)
    kept = Fraction(stream - s["dropped_tokens"], stream)
    assert s["bytes"] == math.floor(sum(len(t.encode("utf-8")) for t in val) * kept + Fraction(1, 2))
    stats = SplitStats([m], "val")
    assert stats.bytes_known and stats.unigram_known
    # a demo cache from before these fields (no bytes, no demo_version) is rebuilt, atomically in place
    old = json.loads((path / "manifest.json").read_text())
    old["source"].pop("demo_version", None)
    for split in old["splits"].values():
        del split["bytes"], split["token_counts"]
    (path / "manifest.json").write_text(json.dumps(old))
    logs = []
    assert ensure_demo_corpus(log=logs.append) == path
    assert any(line.startswith("shard:") for line in logs)
    assert open_dataset(path)["splits"] == m["splits"]
