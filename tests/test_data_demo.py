"""The embedded demo corpus: built once even when several ranks ask at the same time."""

import json
import multiprocessing as mp

import numpy as np
import torch

from prime_scale.cli import main as cli
from prime_scale.config import load_recipe
from data_prep.demo import DEMO_VOCAB, ensure_demo_corpus
from prime_scale.data import build_loader, load_tokenizer, open_dataset


def _ensure(root, queue):
    logs = []
    path = ensure_demo_corpus(root, log=logs.append)
    queue.put((str(path), logs))


def test_demo_corpus_concurrent_build_then_train_batches(tmp_path, monkeypatch, capsys):
    root = tmp_path / "demo"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(root, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert {r[0] for r in results} == {str(root / "L128")}
    builds = [logs for _, logs in results if any("demo: ready" in m for m in logs)]
    assert len(builds) == 1  # the other rank waited on the lock (or came after) and built nothing

    m = open_dataset(root / "L128")
    assert (m["format"], m["vocab_size"], m["seq_len"]) == ("mds", DEMO_VOCAB, 128)
    assert m["splits"]["train"]["tokens"] > 300_000 and m["splits"]["val"]["sequences"] > 100
    assert m["source"]["kind"] == "demo"

    # data.path null in the default recipe means the demo corpus
    monkeypatch.setenv("PRIME_SCALE_DEMO_DIR", str(root))
    cfg = load_recipe(None, ["data.num_workers=0"])
    assert cfg.data.path is None
    batch = next(iter(build_loader(cfg, "train", 0, 1, cfg.train.micro_batch, seed=cfg.seed)))
    assert batch["input_ids"].shape == (cfg.train.micro_batch, 128) and batch["input_ids"].dtype == torch.long
    tok = load_tokenizer(root / "L128")
    corpus = "".join(json.loads(line)["text"] for line in (root / "corpus.jsonl").read_text().splitlines())
    body = batch["input_ids"][0, 1:-1].numpy()
    runs = np.split(body, np.nonzero(body == tok.eos_id)[0])  # document pieces inside the sequence
    piece = tok.decode(max(runs, key=len).tolist()[1:])[:200]
    assert len(piece) > 20 and piece in corpus  # the sequence is real text of the corpus

    # an incomplete dataset (no manifest) is rebuilt; the corpus and tokenizer are reused
    tok_hash = tok.hash
    (root / "L128" / "manifest.json").unlink()
    logs = []
    ensure_demo_corpus(root, log=logs.append)
    assert not any("documents from CPython" in s for s in logs) and any("shard:" in s for s in logs)
    again = open_dataset(root / "L128")
    assert again["tokenizer"]["hash"] == tok_hash
    assert again["splits"] == m["splits"]
    assert np.array_equal(next(iter(build_loader(cfg, "train", 0, 1, cfg.train.micro_batch, seed=cfg.seed)))["input_ids"],
                          batch["input_ids"])
    assert cli(["prep", "demo", "--root", str(root)]) == 0  # complete: returns at once
    assert capsys.readouterr().out.strip() == str(root / "L128")
