"""The embedded demo corpus: real English that ships with CPython, no download.

Documents: every topic of `pydoc_data.topics` (the reference sections of the Python docs) and, for
every module of the standard library source tree, its docstrings (module, classes, functions, in
source order) read with `ast` — nothing is imported, so no module runs. About 2 MB of text.

Layout under the demo root: prime_scale/data/demo.py (the library reads what this module builds).
`ensure_demo_corpus` is safe to call from every rank at once: the first caller takes an exclusive
lock on ROOT/.build.lock (flock: released by the kernel when the process exits, so a crashed
builder never leaves a stale lock) and builds what is missing; the others wait on the lock and then
find the dataset complete. Each part is published atomically and the manifest is written last. A
dataset built by an older demo version (prime_scale.data.demo.DEMO_VERSION) counts as incomplete
and is rebuilt in place (corpus and tokenizer reused).
"""

from __future__ import annotations

import ast
import fcntl
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator, Optional

from data_prep.readers import ReadOptions
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale import fsio
from prime_scale.data.demo import DEMO_VERSION, ROOT_ENV, dataset_dir, demo_root, is_complete
from prime_scale.data.tokenizer import load_tokenizer
from prime_scale.errors import UserError

DEMO_VOCAB = 16384  # b = 128 sub-token symbols at ell = 2 (docs/benchmarks.md, "The default run": why)
# the fixed yardstick of the default run: the unigram baseline of the val split under a tokenizer
# of this size trained on the same corpus, so that a tokenizer with a worse baseline of its own
# cannot make the default look better than it is (recorded in the manifest: source.reference_unigram)
REFERENCE_VOCAB = 4096
DEMO_SEQ_LEN = 128
DEMO_VAL_FRACTION = 0.05
CORPUS_FILE = "corpus.jsonl"
TOKENIZER_DIR = "tokenizer"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
              "turtledemo"}


def _docstrings(node: ast.AST) -> Iterator[str]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def demo_documents() -> Iterator[tuple[str, str]]:
    """(source, text) of every demo document, in a fixed order."""
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield f"pydoc_data.topics:{name}", pydoc_data.topics.topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / name
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue  # a few stdlib files are templates or data, not Python of this version
            text = "\n\n".join(_docstrings(tree))
            if text.strip():
                yield f"stdlib:{path.relative_to(stdlib).as_posix()}", text


def write_corpus(path: Path) -> int:
    lines = [json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
             for source, text in demo_documents()]
    fsio.write_atomic(path, "".join(lines))
    return len(lines)


def build_demo(root: str | Path, seq_len: int = DEMO_SEQ_LEN, vocab_size: int = DEMO_VOCAB,
               workers: Optional[int] = None, log=print) -> Path:
    """Build whatever part of the demo is missing; return the dataset directory.

    Not safe against a concurrent builder by itself: ensure_demo_corpus holds a file lock around it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    corpus = root / CORPUS_FILE
    if not corpus.exists():
        n = write_corpus(corpus)
        log(f"demo: {n} documents from CPython's own documentation -> {corpus} ({time.time() - t0:.1f}s)")
    tok_dir = root / TOKENIZER_DIR
    if not _has_tokenizer(tok_dir, vocab_size):  # absent, or of an older demo's size
        train_tokenizer([str(corpus)], tok_dir, vocab_size, "bpe", ReadOptions(format="jsonl"), overwrite=True,
                        log=log)
    out = dataset_dir(root, seq_len)
    if not is_complete(out):  # absent, interrupted, or built by an older demo version: replaced atomically
        source = {"kind": "demo", "demo_version": DEMO_VERSION,
                  "reference_unigram": reference_unigram(root, corpus, seq_len, workers, log)}
        shard_corpus([str(corpus)], load_tokenizer(tok_dir), out, _shard_options(seq_len, workers),
                     ReadOptions(format="jsonl"), log=log, source_info=source)
    log(f"demo: ready in {out} ({time.time() - t0:.1f}s)")
    return out


def _shard_options(seq_len: int, workers: Optional[int]) -> ShardOptions:
    return ShardOptions(seq_len=seq_len, format="mds", val_fraction=DEMO_VAL_FRACTION, workers=workers or 0,
                        overwrite=True, progress=False)


def _has_tokenizer(tok_dir: Path, vocab_size: int) -> bool:
    meta = tok_dir / "tokenizer.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("vocab_size") == vocab_size
    except (OSError, ValueError):
        return False


def reference_unigram(root: Path, corpus: Path, seq_len: int, workers: Optional[int] = None, log=print) -> dict:
    """The unigram baseline of the val split under a REFERENCE_VOCAB-piece tokenizer trained on the
    same corpus: the same documents (the split is decided by each document's text), packed the same
    way, scored as the evaluator scores the whole split (prime_scale.data.stats: every position,
    add-one smoothed training frequencies). Built in a scratch directory that is removed after."""
    import shutil

    import torch

    from prime_scale.data import open_dataset
    from prime_scale.data.stats import SplitStats

    scratch = root / f".reference-{REFERENCE_VOCAB}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        quiet = lambda _msg: None  # noqa: E731 (one line of our own below says what was done)
        train_tokenizer([str(corpus)], scratch / TOKENIZER_DIR, REFERENCE_VOCAB, "bpe", ReadOptions(format="jsonl"),
                        overwrite=True, log=quiet)
        shard_corpus([str(corpus)], load_tokenizer(scratch / TOKENIZER_DIR), scratch / "data",
                     _shard_options(seq_len, workers), ReadOptions(format="jsonl"), log=quiet)
        m = open_dataset(scratch / "data")
        counts = torch.tensor(m["splits"]["val"]["token_counts"], dtype=torch.float64)
        log_q = SplitStats([m], "val", [1.0]).unigram_log_probs()
        nats = float(-(counts * log_q).sum())
        tokens, nbytes = float(counts.sum()), int(m["splits"]["val"]["bytes"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = {"vocab_size": REFERENCE_VOCAB, "tokenizer": "sentencepiece bpe trained on the demo corpus",
           "seq_len": seq_len, "nats_per_token": nats / tokens, "bits_per_byte": nats / (math.log(2) * nbytes)}
    log(f"demo: reference unigram baseline ({REFERENCE_VOCAB} pieces) of the val split: "
        f"{out['bits_per_byte']:.4f} bits/byte")
    return out


def ensure_demo_corpus(root: Optional[str | Path] = None, seq_len: int = DEMO_SEQ_LEN, log=None) -> Path:
    """The prepared demo dataset directory for `seq_len`, built first if absent or incomplete."""
    root = demo_root(root)
    target = dataset_dir(root, seq_len)
    if is_complete(target):
        return target
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".build.lock", "a+")
    except OSError as e:
        raise UserError(f"{root}: cannot create the demo corpus directory: {e.strerror}; set data.path, or "
                        f"{ROOT_ENV} to a writable directory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"demo: another process is building the demo corpus in {root}; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_complete(target):
                build_demo(root, seq_len, log=log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
