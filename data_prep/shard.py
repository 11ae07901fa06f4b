"""Tokenize a corpus in parallel, pack it into fixed-length sequences, write MDS or webdataset shards.

Packing is the reference's "wrap": every document's ids are followed by EOS, the documents of a
split are concatenated into one stream, the stream is cut into bodies of L-2 ids, and each body
becomes BOS + body + EOS. The incomplete tail of the stream is dropped (and counted).

The manifest also records per split `bytes` (UTF-8 size of the text its sequences hold: for bits
per byte) and `token_counts` (each id's occurrences in the written sequences: the unigram baseline),
and `files`: the size and sha256 of every file written (prime_scale/data/integrity.py). The writers
themselves are data_prep/writers.py.

The train/validation split is by document and by content: a keyed hash of the document decides,
so the split does not depend on file order, and duplicate documents never straddle the splits.

The output directory is built under a temp name and renamed into place with its manifest, so an
interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_prep.readers import ReadOptions, ReadStats, empty_corpus_error, iter_documents
from data_prep.writers import MDSOut, WDSOut
from prime_scale import __version__, fsio
from prime_scale.data.format import MANIFEST_NAME, MANIFEST_VERSION, token_dtype
from prime_scale.data.integrity import describe_files
from prime_scale.data.tokenizer import Tokenizer, write_tokenizer_dir
from prime_scale.errors import UserError

TOKENIZER_SUBDIR = "tokenizer"
BATCH_CHARS = 1 << 16  # text per task sent to a worker: amortises IPC, small enough to balance load


@dataclass
class ShardOptions:
    seq_len: int
    format: str = "mds"  # mds | wds
    val_fraction: float = 0.0
    split_seed: int = 0
    workers: int = 0  # 0: all cores
    shard_bytes: int = 1 << 26  # target size of one shard
    compression: Optional[str] = None  # MDS only: e.g. zstd
    overwrite: bool = False
    progress: bool = True


# --------------------------------------------------------------------------- workers


_TOK: Optional[Tokenizer] = None
_SPLIT_KEY = b""
_VAL_THRESHOLD = 0
_DTYPE = np.dtype(np.int64)


def _init_worker(tokenizer: Tokenizer, split_seed: int, val_fraction: float) -> None:
    global _TOK, _SPLIT_KEY, _VAL_THRESHOLD, _DTYPE
    _TOK = tokenizer
    _SPLIT_KEY = split_seed.to_bytes(8, "little", signed=True)
    _VAL_THRESHOLD = int(val_fraction * (1 << 64))
    _DTYPE = np.dtype(token_dtype(tokenizer.vocab_size))  # the shards' dtype: 4x less to ship than int64


def _is_val(data: bytes) -> bool:
    if not _VAL_THRESHOLD:
        return False
    h = hashlib.blake2b(data, digest_size=8, key=_SPLIT_KEY).digest()
    return int.from_bytes(h, "little") < _VAL_THRESHOLD


def _encode_batch(batch: list) -> dict:
    """Encode a batch of documents -> {split: (ids of its documents, each followed by EOS,
    number of documents, number of tokenizer ids, UTF-8 bytes of the documents' text)}."""
    encoded = iter(_TOK.encode_batch([d[0] for d in batch if d[0] is not None]))
    V, eos = _TOK.vocab_size, np.array([_TOK.eos_id], dtype=_DTYPE)
    parts: dict = {"train": [], "val": []}
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}
    for text, ids, source, line in batch:
        if text is not None:
            ids = np.asarray(next(encoded), dtype=_DTYPE)
            key = text.encode("utf-8")
        else:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                bad = int(ids[(ids < 0) | (ids >= V)][0])
                raise UserError(f"{source}:{line}: token id {bad} is outside the vocabulary [0, {V})")
            key = ids.astype("<u4").tobytes()
            ids = ids.astype(_DTYPE)
        split = "val" if _is_val(key) else "train"
        parts[split] += [ids, eos]
        counts[split][0] += 1
        counts[split][1] += ids.size
        counts[split][2] += len(key) if text is not None else 0  # pre-tokenized: there is no text
    return {s: (np.concatenate(parts[s]) if parts[s] else np.empty(0, _DTYPE), *counts[s]) for s in parts}


# --------------------------------------------------------------------------- packing and writing


class Packer:
    """Cuts a stream of ids into BOS + (L-2 ids) + EOS sequences."""

    def __init__(self, seq_len: int, bos: int, eos: int, dtype: str):
        self.body = seq_len - 2
        self.bos, self.eos, self.dtype = bos, eos, np.dtype(dtype)
        self.pending: list[np.ndarray] = []
        self.pending_len = 0

    def add(self, stream: np.ndarray) -> np.ndarray:
        """Append ids; return the completed sequences as an array [n, seq_len]."""
        self.pending.append(stream)
        self.pending_len += stream.size
        n = self.pending_len // self.body
        if n == 0:
            return np.empty((0, self.body + 2), self.dtype)
        flat = np.concatenate(self.pending)
        bodies = flat[: n * self.body].reshape(n, self.body)
        rest = flat[n * self.body:]
        self.pending, self.pending_len = [rest], rest.size
        seqs = np.empty((n, self.body + 2), self.dtype)
        seqs[:, 0], seqs[:, -1], seqs[:, 1:-1] = self.bos, self.eos, bodies
        return seqs

    @property
    def dropped(self) -> int:
        return self.pending_len


def split_bytes(text_bytes: int, stream_ids: int, dropped: int) -> int:
    """UTF-8 bytes of the text a split's sequences hold (text_bytes: its documents'; stream_ids: their
    ids + one EOS each), rounded to the nearest int, halves up. Exact when nothing is dropped; else
    the dropped tail (< seq_len - 2 ids) is prorated at the split's mean bytes per id: which bytes its
    ids stand for is unknown without decoding them, and the error is under one sequence's text."""
    if stream_ids <= 0:
        return 0
    kept = stream_ids - dropped
    return (2 * text_bytes * kept + stream_ids) // (2 * stream_ids)  # integer maths: exact at any size


# --------------------------------------------------------------------------- progress


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.time()

    def update(self, docs: int, tokens: int, seqs: int, final: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        line = (f"shard: {docs:,} docs ({docs / dt:,.0f}/s)  {tokens / 1e6:,.2f} M tokens "
                f"({tokens / dt / 1e6:,.2f} M/s)  {seqs:,} sequences  {dt:.1f}s")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- driver


def _batches(docs, target_chars: int):
    batch, size = [], 0
    for d in docs:
        batch.append((d.text, d.ids, d.source, d.line))
        size += len(d.text) if d.text is not None else 4 * len(d.ids)
        if size >= target_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_options(opts: ShardOptions, read: ReadOptions, tokenizer: Tokenizer, out: Path) -> None:
    if opts.format not in ("mds", "wds"):
        raise UserError(f"--format {opts.format}: expected mds or wds")
    if opts.seq_len < 3:
        raise UserError(f"--seq-len {opts.seq_len}: needs at least 3 (BOS + body + EOS)")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise UserError(f"--val-fraction {opts.val_fraction}: expected a number in [0, 1)")
    if opts.compression and opts.format != "mds":
        raise UserError("--compression applies to MDS shards only")
    if out.exists() and not opts.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if (read.ids_field is None) != (tokenizer.kind != "external"):
        raise UserError("pre-tokenized input (--ids-field) goes with an external vocabulary (--vocab-size), "
                        "and text goes with a trained tokenizer (--tokenizer DIR)")


def _write_splits(tmp: Path, splits: list[str], inputs: Sequence[str], read: ReadOptions, tokenizer: Tokenizer,
                  opts: ShardOptions, dtype: str, stats: ReadStats) -> dict:
    """Tokenize and pack the documents into each split's shards (in worker processes when
    opts.workers > 1); returns each split's counts."""
    workers = opts.workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:  # fork the workers before any writer starts threads
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = stack.enter_context(ctx.Pool(workers, _init_worker, (tokenizer, opts.split_seed, opts.val_fraction)))
        else:
            _init_worker(tokenizer, opts.split_seed, opts.val_fraction)
        writer_cls = MDSOut if opts.format == "mds" else WDSOut
        writers = {s: writer_cls(tmp / s, opts.seq_len, dtype, opts) for s in splits}
        packers = {s: Packer(opts.seq_len, tokenizer.bos_id, tokenizer.eos_id, dtype) for s in splits}
        totals = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in splits}
        # counted here, on what is written, so the workers' order and count cannot matter
        id_counts = {s: np.zeros(tokenizer.vocab_size, dtype=np.int64) for s in splits}
        progress = Progress(opts.progress)
        tokens_seen = 0

        def consume(result: dict) -> None:
            nonlocal tokens_seen
            for s in splits:
                stream, *sizes = result[s]
                for key, n in zip(("documents", "tokens", "text_bytes"), sizes):
                    totals[s][key] += n
                tokens_seen += sizes[1]
                seqs = packers[s].add(stream)
                writers[s].write(seqs)
                id_counts[s] += np.bincount(seqs.reshape(-1), minlength=tokenizer.vocab_size)
            progress.update(stats.documents, tokens_seen, sum(w.count for w in writers.values()))

        batches = _batches(iter_documents(inputs, read, stats), BATCH_CHARS)
        if pool is None:
            for batch in batches:
                consume(_encode_batch(batch))
        else:
            inflight: collections.deque = collections.deque()
            for batch in batches:  # read in this thread; keep a bounded number of tasks in flight
                inflight.append(pool.apply_async(_encode_batch, (batch,)))
                if len(inflight) >= 2 * workers:
                    consume(inflight.popleft().get())
            while inflight:
                consume(inflight.popleft().get())
    progress.update(stats.documents, tokens_seen, sum(w.count for w in writers.values()), final=True)
    if stats.documents == 0:
        raise empty_corpus_error(inputs, stats)
    return {s: _split_meta(totals[s], writers[s], packers[s], id_counts[s], read.ids_field is None) for s in splits}


def _split_meta(totals: dict, writer, packer: Packer, id_counts: np.ndarray, has_text: bool) -> dict:
    """A split's manifest entry; `bytes` is null for pre-tokenized input, which has no text."""
    stream_ids = totals["documents"] + totals["tokens"]  # every document's ids and its EOS
    nbytes = split_bytes(totals["text_bytes"], stream_ids, packer.dropped) if has_text else None
    return {"documents": totals["documents"], "tokens": totals["tokens"], "sequences": writer.count,
            "dropped_tokens": packer.dropped, "bytes": nbytes, **writer.finish(), "token_counts": id_counts.tolist()}


def _manifest_text(manifest: dict) -> str:
    """The manifest as indented JSON, each list of ints (token_counts) on one line, not V lines (a
    JSON string holds no raw newline, so only the layout's own multi-line lists match)."""
    text = json.dumps(manifest, indent=2)
    return re.sub(r"\[(?:\n *-?\d+,?)+\n *\]", lambda m: re.sub(r"\s+", "", m.group(0)), text) + "\n"


def _check_splits(split_meta: dict, seq_len: int) -> None:
    if split_meta["train"]["sequences"] == 0:
        raise UserError(f"the corpus is too small: its {split_meta['train']['tokens']} training tokens do not "
                        f"fill one sequence of --seq-len {seq_len}")
    if "val" in split_meta and split_meta["val"]["sequences"] == 0:
        raise UserError(f"the validation split got {split_meta['val']['documents']} document(s), "
                        f"{split_meta['val']['tokens']} tokens: not one sequence of {seq_len}; raise "
                        "--val-fraction, or use --val-fraction 0 for no validation split")


def shard_corpus(inputs: Sequence[str], tokenizer: Tokenizer, out: str | Path, opts: ShardOptions,
                 read: Optional[ReadOptions] = None, log=print, source_info: Optional[dict] = None) -> dict:
    """Prepare a dataset directory from raw inputs. Returns the manifest."""
    read = read or ReadOptions()
    out = Path(out)
    _check_options(opts, read, tokenizer, out)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = ReadStats()
    manifest: dict = {}

    def build(tmp: Path) -> None:
        splits = ["train", "val"] if opts.val_fraction > 0 else ["train"]
        split_meta = _write_splits(tmp, splits, inputs, read, tokenizer, opts, dtype, stats)
        _check_splits(split_meta, opts.seq_len)
        tok_meta = tokenizer.meta()
        if tokenizer.kind == "sentencepiece":
            (tmp / TOKENIZER_SUBDIR).mkdir()
            write_tokenizer_dir(tokenizer, tmp / TOKENIZER_SUBDIR)
            tok_meta["dir"] = TOKENIZER_SUBDIR
        manifest.update({
            "version": MANIFEST_VERSION,
            "kind": "prime-scale-dataset",
            "format": opts.format,
            "vocab_size": tokenizer.vocab_size,
            "seq_len": opts.seq_len,
            "dtype": dtype,
            "packing": "wrap: documents + EOS concatenated, cut into BOS + (seq_len-2) + EOS",
            "splits": split_meta,
            "tokenizer": tok_meta,
            # every file's size and sha256, read back from the page cache: checked when the data is read
            "files": describe_files(tmp),
            "source": {"inputs": [str(i) for i in inputs], "format": read.format, "text_field": read.text_field,
                       "ids_field": read.ids_field, "doc_boundary": read.doc_boundary, "errors": read.errors,
                       "val_fraction": opts.val_fraction, "split_seed": opts.split_seed, **stats.as_dict(),
                       **(source_info or {})},
            "created_by": f"prime-scale {__version__} (python {platform.python_version()})",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        fsio.write_atomic(tmp / MANIFEST_NAME, _manifest_text(manifest))

    t0 = time.time()
    fsio.publish_dir(out, build, opts.overwrite)
    tr = manifest["splits"]["train"]
    msg = (f"shard: {stats.documents:,} documents -> {opts.format} {out}: train {tr['sequences']:,} sequences "
           f"of {opts.seq_len}")
    if "val" in manifest["splits"]:
        msg += f", val {manifest['splits']['val']['sequences']:,}"
    if stats.replaced:
        msg += f"; {stats.replaced} invalid UTF-8 sequence(s) replaced"
    log(msg + f" ({time.time() - t0:.1f}s)")
    return manifest
