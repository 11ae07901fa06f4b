"""Consolidate a sharded checkpoint of any layout into one safetensors file, config.json and the
tokenizer: the layout-free form that evaluation, sampling and --init-from read. Tensors stream
through one at a time (export/reader.py says where each one's values live), so peak memory is a small
multiple of the largest tensor, whatever the model size (bench/bench_convert.py measures it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from prime_scale import fsio
from prime_scale.checkpoint import catalog
from prime_scale.data.tokenizer import copy_tokenizer_files, tokenizer_identity
from prime_scale.errors import UserError
from prime_scale.export.reader import MIN_BUDGET, ShardedReader, output_dtype, plan
from prime_scale.export.safetensors_stream import StreamWriter


# --------------------------------------------------------------------------- config.json and tokenizer


def model_config(manifest: dict, weights: str, dtype: torch.dtype) -> dict:
    """config.json: everything an evaluator or sampler needs to rebuild the model from the file."""
    from prime_scale.prime import base_for

    recipe = manifest.get("recipe") or {}
    model = dict(recipe.get("model") or {})
    vocab = manifest.get("vocab_size") or model.get("vocab_size")
    if vocab is not None:
        model["vocab_size"] = int(vocab)
    ell = int(model.get("ell", 1))
    return {
        "format": "prime-scale-consolidated",
        "version": 1,
        "model": model,
        "vocab_size": model.get("vocab_size"),
        "ell": ell,
        "base": base_for(int(vocab), ell) if vocab is not None else None,
        "objective": model.get("objective"),
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "step": manifest["step"],
        "source_layout": manifest["layout"],
        "tokenizer": ({k: manifest["tokenizer"][k] for k in ("files", "sha256")}
                      if manifest.get("tokenizer") else None),
        "precision": recipe.get("precision"),
        "seed": recipe.get("seed"),
        "recipe": recipe,
    }


def copy_tokenizer(folder: Path, manifest: dict, out: Path) -> Optional[list[str]]:
    """Copy the run's tokenizer files next to the weights; the sha256 recorded at save time must match."""
    tok = manifest.get("tokenizer")
    if not tok:
        return None
    candidates = [folder / tok["copy"]] if tok.get("copy") else []
    candidates.append(Path(tok["source"]))
    for src in candidates:
        if src.exists() and tokenizer_identity(src)["sha256"] == tok["sha256"]:
            copy_tokenizer_files(src, tok["files"], out / "tokenizer")
            return tok["files"]
    raise UserError(f"{folder}: the run's tokenizer (sha256 {tok['sha256'][:12]}…) is neither in the checkpoint "
                    f"nor unchanged at {tok['source']}")


# --------------------------------------------------------------------------- the whole conversion


@dataclasses.dataclass
class Report:
    out: Path
    weights: str
    tensors: int
    total_bytes: int
    largest_bytes: int
    largest_name: str


def pick_weights(requested: str, has_ema: bool, where) -> str:
    """'ema' or 'raw' for a request of 'auto' (EMA when present), 'ema' or 'raw'."""
    if requested == "auto":
        return "ema" if has_ema else "raw"
    if requested not in ("ema", "raw"):
        raise UserError(f"weights must be auto, ema or raw, got {requested!r}")
    if requested == "ema" and not has_ema:
        raise UserError(f"{where}: holds no EMA weights (the run had optim.ema = 0); use --weights raw or auto")
    return requested


def consolidate(ckpt: Path, out: Path, weights: str = "auto", dtype: Optional[torch.dtype] = None) -> Report:
    """Write `out/model.safetensors`, `out/config.json` and `out/tokenizer/` from a checkpoint folder.
    weights: auto (EMA when the run kept one), ema or raw. The output appears atomically: everything
    is written to a temporary sibling and renamed."""
    folder = Path(ckpt)
    out = Path(out)
    manifest = catalog.read_manifest(folder)
    weights = pick_weights(weights, bool(manifest.get("ema")), folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose another --out or remove it")
    plans = plan(manifest)
    entries = [(p.name, output_dtype(p, dtype), p.shape) for p in plans]
    sizes = [(math.prod(s) * torch.empty((), dtype=d).element_size(), n) for n, d, s in entries]
    largest_bytes, largest_name = max(sizes, default=(0, ""))

    report = {}

    def build(tmp: Path) -> None:
        meta = {"format": "prime-scale", "weights": weights, "step": str(manifest["step"])}
        budget = max(MIN_BUDGET, max((p.nbytes_fp32 for p in plans), default=0))
        reader = ShardedReader(folder, manifest, weights, budget)
        with StreamWriter(tmp / "model.safetensors", entries, meta) as writer:
            for p, (name, d, _) in zip(plans, entries):
                writer.write(name, reader.full(p).to(d))
        reader.files.cache.clear()
        report["bytes"] = writer.total_bytes
        config = model_config(manifest, weights, dtype or torch.float32)
        config["params"] = {p.name: {"partition_dim": p.partition_dim, "partition_stride": p.stride,
                                     "padded_to_tp": p.unpadded_size is not None}
                            for p in plans if p.kind == "param"}
        copy_tokenizer(folder, manifest, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    fsio.publish_dir(out, build)
    return Report(out, weights, len(plans), report["bytes"], largest_bytes, largest_name)
