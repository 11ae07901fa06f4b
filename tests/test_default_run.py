"""What the default run reports beyond its bound: the samples' word share against the training
text, the demo's fixed reference unigram baseline, and the ℓ study's command (a miniature of it)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.demo import REFERENCE_VOCAB, demo_documents, ensure_demo_corpus
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.data import SplitStats, build_loader, load_tokenizer, open_dataset
from prime_scale.sample_words import training_words, word_share

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """30 real documents, a 400-piece tokenizer, MDS at L = 32: every document in train (data), or a
    quarter of them held out (split)."""
    root = tmp_path_factory.mktemp("words")
    docs = [t for _, t in itertools.islice(demo_documents(), 30)]
    with open(root / "docs.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer([str(root / "docs.jsonl")], root / "tok", 400, **QUIET)
    shard_corpus([str(root / "docs.jsonl")], tok, root / "data",
                 ShardOptions(seq_len=32, format="mds", progress=False, workers=1, shard_bytes=4096), **QUIET)
    shard_corpus([str(root / "docs.jsonl")], tok, root / "split",  # the same with a validation split
                 ShardOptions(seq_len=32, format="mds", val_fraction=0.25, progress=False, workers=1), **QUIET)
    return root, docs, tok


def test_training_words_are_the_words_of_the_training_documents(small):
    root, docs, tok = small
    m = open_dataset(root / "data")
    words = training_words([m], tok)
    assert words.whole_split and words.tokens_read == m["splits"]["train"]["sequences"] * 30
    # independently: each document through the tokenizer and back. The split ends at a whole
    # sequence (its tail is dropped), so the last document may lose words: compare the others.
    # No word is cut: not at a row boundary (the rows' framing joins the stream back), nor where
    # the split ends
    expected = set().union(*(tok.decode(tok.encode(d)).split() for d in docs[:-1]))
    assert expected <= words.words <= expected | set(tok.decode(tok.encode(docs[-1])).split())
    # a budget below the split reads the first rows only, and says so
    part = training_words([m], tok, max_tokens=300)
    assert not part.whole_split and part.tokens_read == 300 // 30 * 30 and part.words < words.words


def test_word_share_counts_known_words_exactly(small):
    root, docs, tok = small
    words = training_words([open_dataset(root / "data")], tok)
    known = sorted(words.words)[:7]
    share = word_share([" ".join(known[:4]) + " qzxv", "\n".join(known[4:]) + " wkpj ffz"], words)
    assert (share.known, share.total) == (7, 10) and share.share == pytest.approx(0.7)
    assert "70.0% of the samples' 10 words occur in the training text" == share.describe()


def test_the_demo_records_a_reference_unigram_equal_to_scoring_its_val_split(tmp_path):
    """source.reference_unigram of the demo equals the evaluator's unigram arithmetic over the ids a
    4096-piece tokenization of the same corpus puts in the val split, read through the loader."""
    from prime_scale.config import load_recipe

    target = ensure_demo_corpus()
    m = open_dataset(target)
    ref = m["source"]["reference_unigram"]
    assert ref["vocab_size"] == REFERENCE_VOCAB != m["vocab_size"] and ref["seq_len"] == m["seq_len"]
    corpus = target.parent / "corpus.jsonl"
    tok = train_tokenizer([str(corpus)], tmp_path / "tok", REFERENCE_VOCAB, **QUIET)
    shard_corpus([str(corpus)], tok, tmp_path / "data",
                 ShardOptions(seq_len=m["seq_len"], format="mds", val_fraction=0.05, progress=False, workers=0),
                 **QUIET)
    cfg = load_recipe(None, [f"data.path={tmp_path / 'data'}", "data.num_workers=0"])
    loader = build_loader(cfg, "val", 0, 1, 64, cfg.seed, single_pass=True)
    stats = SplitStats(loader.manifests, "val", loader.weights)
    log_q = stats.unigram_log_probs()
    nats = tokens = nbytes = 0.0
    for batch in loader:
        rows = batch["valid"]
        ids = batch["input_ids"][rows]
        nats += float(-log_q[ids].sum())
        tokens += ids.numel()
        nbytes += float(stats.sequence_bytes(batch["index"][rows]).sum())
    assert ref["nats_per_token"] == pytest.approx(nats / tokens, rel=1e-9)
    assert ref["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    # the demo's val split holds the same documents: its bytes agree up to the prorated dropped tail
    assert open_dataset(tmp_path / "data")["splits"]["val"]["bytes"] == pytest.approx(m["splits"]["val"]["bytes"], rel=2e-3)


def test_ell_study_miniature_writes_its_report_and_resumes(small, tmp_path):
    root, _, _ = small
    work, out = tmp_path / "work", tmp_path / "ell-study.md"
    cmd = [sys.executable, str(REPO / "bench" / "ell_study.py"), "--mini", "--data", str(root / "split"),
           "--work", str(work), "--out", str(out), "model.seq_len=32"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cells = sorted(p.name for p in work.iterdir())
    assert cells == sorted(f"ell{e}-{o}" for e in (1, 2, 4) for o in ("elbo", "joint"))
    results = {c: json.loads((work / c / "result.json").read_text()) for c in cells}
    for name, r in results.items():
        assert r["tokens_seen"] == 2 * 4 * 32 and math.isfinite(r["bound_nats_per_token"]), name
        assert 0.0 <= r["batch_isr_at_128"] <= r["seq_isr_at_128"] <= 1.0 and r["curve"], name
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 6 and "*not a bound*" in text and "(ell-study.png)" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation keeps every finished cell and only rewrites the report
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("done earlier, kept") == 6, again.stdout[-2000:]
    assert "training" not in again.stdout
