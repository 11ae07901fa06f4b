"""The manifest of a prepared dataset: what the shards hold, and the checks against a recipe.

A prepared dataset is a directory (or a remote URI holding the same tree):

    manifest.json           written last: its presence means the dataset is complete
    tokenizer/              the tokenizer files (sentencepiece), so a dataset is self-contained
    train/, val/            one folder of shards per split (MDS: index.json + *.mds; wds: *.tar)

Every sample is one fixed-length sequence of `seq_len` token ids (BOS + body + EOS, packed from
documents by `prime-scale prep shard`). Each split may record `bytes` (the UTF-8 size of its text,
null for pre-tokenized input) and `token_counts` (each id's occurrences over all positions of its
sequences); manifests written before these existed lack them and stay valid (prime_scale/data/stats.py
says what is then unknown). `files` lists every other file of the dataset with its size and sha256
(prime_scale/data/integrity.py checks them); older manifests lack it and stay valid, unverified.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from prime_scale.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("mds", "wds")
TOKENIZER_KINDS = ("sentencepiece", "external")
# the column / member name under which each sample's token ids are stored
TOKENS_FIELD = "tokens"
# a tokenizer directory: tokenizer.json (kind, special ids, hash) and, for sentencepiece, the model
TOKENIZER_META = "tokenizer.json"
SP_MODEL = "tokenizer.model"


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _fail(where: str, msg: str) -> UserError:
    return UserError(f"{where}: {msg}")


def validate_manifest(m: Any, where: str) -> dict:
    """Check the fields the loader and trainer rely on; raise UserError naming the file."""
    if not isinstance(m, dict):
        raise _fail(where, "a manifest must be a JSON object")
    if m.get("version") != MANIFEST_VERSION:
        raise _fail(where, f"unsupported manifest version {m.get('version')!r} (this prime-scale reads "
                           f"version {MANIFEST_VERSION}); re-run `prime-scale prep shard`")
    for key, typ in [("format", str), ("vocab_size", int), ("seq_len", int), ("splits", dict),
                     ("tokenizer", dict), ("dtype", str)]:
        if not isinstance(m.get(key), typ):
            raise _fail(where, f"key '{key}' is missing or not a {typ.__name__}")
    if m["format"] not in FORMATS:
        raise _fail(where, f"key 'format' must be one of {', '.join(FORMATS)}, got {m['format']!r}")
    if m["vocab_size"] < 2 or m["seq_len"] < 3:
        raise _fail(where, f"vocab_size={m['vocab_size']} / seq_len={m['seq_len']} are not usable")
    if m["dtype"] not in ("uint16", "uint32"):
        raise _fail(where, f"key 'dtype' must be uint16 or uint32, got {m['dtype']!r}")
    if "train" not in m["splits"]:
        raise _fail(where, "no 'train' split")
    for name, split in m["splits"].items():
        for key in ("documents", "tokens", "sequences"):
            if not isinstance(split, dict) or not isinstance(split.get(key), int):
                raise _fail(where, f"splits.{name}.{key} is missing or not an integer")
        if m["format"] == "wds" and not isinstance(split.get("shards"), list):
            raise _fail(where, f"splits.{name}.shards (the tar shards and their sample counts) is missing")
        _check_split_facts(m, name, split, where)
    tok = m["tokenizer"]
    if tok.get("kind") not in TOKENIZER_KINDS:
        raise _fail(where, f"tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)}, got {tok.get('kind')!r}")
    for key in ("hash", "bos_id", "eos_id"):
        if key not in tok:
            raise _fail(where, f"tokenizer.{key} is missing")
    if tok["kind"] == "sentencepiece" and not isinstance(tok.get("dir"), str):
        raise _fail(where, "tokenizer.dir (where the sentencepiece model lies) is missing")
    if "files" in m:
        _check_files(m["files"], where)
    return m


def _check_files(files: Any, where: str) -> None:
    """The optional list of the dataset's files with their sizes and content hashes (data/integrity.py)."""
    redo = "the manifest is damaged; prepare the dataset again with `prime-scale prep shard`"
    if not isinstance(files, list):
        raise _fail(where, f"key 'files' must be a list of {{path, bytes, sha256}}: {redo}")
    for i, e in enumerate(files):
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and _is_count(e.get("bytes"))
              and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64)
        if not ok:
            raise _fail(where, f"files[{i}] must be {{path, bytes, sha256 (64 hex digits)}}, got {e!r}: {redo}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_split_facts(m: dict, name: str, split: dict, where: str) -> None:
    """The optional per-split facts for bits per byte and the unigram baseline, when present."""
    redo = "the manifest is damaged; prepare the dataset again with `prime-scale prep shard`"
    if "bytes" in split and split["bytes"] is not None and not _is_count(split["bytes"]):
        raise _fail(where, f"splits.{name}.bytes must be a non-negative integer or null, got "
                           f"{split['bytes']!r}: {redo}")
    if "token_counts" not in split:
        return
    counts, V = split["token_counts"], m["vocab_size"]
    if not isinstance(counts, list) or len(counts) != V:
        got = f"a list of {len(counts)}" if isinstance(counts, list) else type(counts).__name__
        raise _fail(where, f"splits.{name}.token_counts must be a list of vocab_size={V} counts, got {got}: {redo}")
    bad = next((i for i, c in enumerate(counts) if not _is_count(c)), None)
    if bad is not None:
        raise _fail(where, f"splits.{name}.token_counts[{bad}] is {counts[bad]!r}, not a non-negative integer: {redo}")
    positions = split["sequences"] * m["seq_len"]
    if sum(counts) != positions:  # every position of every sequence holds one id
        raise _fail(where, f"splits.{name}.token_counts sums to {sum(counts)}, but {split['sequences']} sequences "
                           f"of {m['seq_len']} hold {positions} ids: {redo}")


def read_manifest_file(path: Path) -> dict:
    where = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{where}: not found: this is not a prepared dataset (or its preparation did not "
                        "finish); prepare one with `prime-scale prep shard` or `prime-scale prep demo`") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read: {e.strerror}") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON (line {e.lineno}): {e.msg}") from None
    return validate_manifest(m, where)


def manifest_path(manifest: Mapping) -> str:
    return str(Path(manifest.get("dataset_dir", ".")) / MANIFEST_NAME)


def check_manifest(cfg, manifest: Mapping, where: str | None = None) -> None:
    """Refuse a recipe whose model.vocab_size or model.seq_len disagrees with the data."""
    where = where or manifest_path(manifest)
    V, L = manifest["vocab_size"], manifest["seq_len"]
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != V:
        raise UserError(
            f"{where}: the dataset's vocab_size is {V}, but the recipe sets model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size={V} (or null to take it from the data), "
            "or use data prepared with the model's tokenizer")
    if cfg.model.seq_len != L:
        raise UserError(
            f"{where}: the dataset's sequences are {L} tokens long, but the recipe sets model.seq_len="
            f"{cfg.model.seq_len}; set model.seq_len={L}, or re-shard with "
            f"`prime-scale prep shard --seq-len {cfg.model.seq_len}`")


def split_info(manifest: Mapping, split: str) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{manifest_path(manifest)}: no '{split}' split (has: {', '.join(splits)}); "
                        "prepare the data with --val-fraction > 0 to get a validation split")
    return splits[split]
