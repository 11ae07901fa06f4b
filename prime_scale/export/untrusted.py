"""Checks on a consolidated export read back from disk: model.safetensors and config.json.

An export may have been truncated in a copy, edited, or made by someone else. The safetensors
library reports a malformed file with an error that names neither the file nor the tensor, and it
accepts what prime-scale never writes (integer weights, tensors of another model, NaN values), so
the file's header is read and checked here before the library opens it (the format: an 8-byte
little-endian length N, N bytes of JSON, then the tensors' bytes back to back; see
safetensors_stream.py). Values are checked tensor by tensor as they are loaded (check_finite), never
the whole model at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Optional

import torch

from prime_scale.errors import UserError
from prime_scale.export.safetensors_stream import DTYPES

FORMAT = "prime-scale-consolidated"
VERSION = 1
REEXPORT = "re-export it from the sharded checkpoint with `prime-scale convert CKPT --out DIR`"
# the safetensors library refuses longer headers; a bound also keeps a forged length from allocating
MAX_HEADER_BYTES = 100_000_000
# the dtypes StreamWriter can write; load_consolidated_into also wants a float for a float weight
CODES = {code: dtype for dtype, code in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets into the data area (after the header)
    end: int


class _Malformed(Exception):
    """What is wrong with a safetensors header; read_header names the file and the remedy."""


def read_header(path: Path, where: Optional[str] = None, remedy: str = REEXPORT) -> dict[str, Entry]:
    """The tensors a safetensors file declares, checked: the header fits in the file, every dtype is
    one prime-scale writes, every tensor's bytes match its shape and lie inside the data area, packed
    back to back to its end (as the library requires too). `where` names the file in errors, `remedy`
    says what to do."""
    where = where or str(path)
    try:
        return _parse_header(Path(path))
    except OSError as e:
        raise UserError(f"{where}: cannot read: {e.strerror or e}") from None
    except _Malformed as e:
        raise UserError(f"{where}: not a valid safetensors file: {e}; {remedy}") from None


def _parse_header(path: Path) -> dict[str, Entry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _Malformed(f"{size} bytes, shorter than the 8-byte header length: the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise _Malformed(f"the header length field says {n} bytes, but the file has {size} bytes (and at "
                             f"most {MAX_HEADER_BYTES} are allowed): the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Malformed(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _Malformed("the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Malformed("__metadata__ must map names to strings")
    entries = {name: _entry(name, spec) for name, spec in header.items()}
    _check_packed(entries, size - 8 - n)
    return entries


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name: str, spec) -> Entry:
    if not isinstance(spec, dict):
        raise _Malformed(f"tensor {name}: its header entry is not an object")
    code = spec.get("dtype")
    if code not in CODES:
        raise _Malformed(f"tensor {name} has dtype {code!r}, which prime-scale never writes "
                         f"(it writes {', '.join(sorted(CODES))})")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise _Malformed(f"tensor {name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _Malformed(f"tensor {name}: data_offsets {offsets!r} is not a [begin, end] byte range")
    dtype = CODES[code]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise _Malformed(f"tensor {name}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                         f"its shape {shape} of {code} needs {nbytes}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_packed(entries: dict[str, Entry], data_bytes: int) -> None:
    """Tensors back to back from byte 0 to the end of the file: no overlap, no gap, nothing past the end."""
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.end > data_bytes:
            raise _Malformed(f"tensor {name}: data_offsets [{e.begin}, {e.end}] reach past the end of the "
                             f"data area ({data_bytes} bytes): the file is truncated")
        if e.begin != pos:
            raise _Malformed(f"tensor {name} starts at byte {e.begin} of the data area, but the tensors "
                             f"before it end at byte {pos} (they overlap or leave a gap)")
        pos = e.end
    if pos != data_bytes:
        raise _Malformed(f"the tensors end at byte {pos}, but the data area has {data_bytes} bytes")


def check_finite(where: str, name: str, tensor: torch.Tensor) -> None:
    """NaN or infinite weights would only show up later as a NaN bound or garbage samples."""
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise UserError(f"{where}: tensor {name} holds {bad} NaN or infinite values (of {tensor.numel()}); "
                            f"the weights are corrupt or the run diverged: {REEXPORT}, or use an earlier checkpoint")


# --------------------------------------------------------------------------- config.json

# key -> (type, how users read it); what load_model, recipe_of and check_init_from rely on
CONFIG_KEYS = {"format": (str, "a string"), "version": (int, "an integer"), "weights": (str, "a string"),
               "vocab_size": (int, "an integer"), "model": (dict, "an object"), "recipe": (dict, "an object")}
RECIPE_SECTIONS = ("model", "data", "train", "parallel")  # load_model merges into these


def parse_config(raw: bytes, f: Path) -> dict:
    """config.json of a consolidated export, checked for the keys and types the loaders use."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{f}: not valid JSON ({e}); {REEXPORT}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{f}: not a JSON object, so not a config.json written by prime-scale convert; {REEXPORT}")
    if meta.get("format") != FORMAT:
        raise UserError(f"{f}: format is {meta.get('format')!r}, not {FORMAT!r}: not a prime-scale checkpoint "
                        f"(a directory written by prime-scale convert)")
    for key, (tp, name) in CONFIG_KEYS.items():
        if key not in meta:
            raise UserError(f"{f}: key '{key}' is missing; {REEXPORT}")
        value = meta[key]
        if not isinstance(value, tp) or isinstance(value, bool):
            raise UserError(f"{f}: key '{key}' must be {name}, got {type(value).__name__} {_short(value)}; {REEXPORT}")
    if meta["version"] != VERSION:
        raise UserError(f"{f}: version {meta['version']} is not supported (this prime-scale reads version "
                        f"{VERSION}); {REEXPORT} using this prime-scale")
    if meta["weights"] not in ("ema", "raw"):
        raise UserError(f"{f}: key 'weights' must be 'ema' or 'raw', got {_short(meta['weights'])}; {REEXPORT}")
    if meta["vocab_size"] < 1:
        raise UserError(f"{f}: key 'vocab_size' must be at least 1, got {meta['vocab_size']}; {REEXPORT}")
    for section in RECIPE_SECTIONS:
        if not isinstance(meta["recipe"].get(section, {}), dict):
            raise UserError(f"{f}: key 'recipe.{section}' must be an object, got "
                            f"{type(meta['recipe'][section]).__name__}; {REEXPORT}")
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
