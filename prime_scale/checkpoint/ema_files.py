"""The EMA weights' files in a checkpoint (`ema/`), in one of three modes (manifest["ema"]):

- `split` (written today outside ZeRO-3): the data-parallel ranks of a model-parallel shard hold the
  same TP-local EMA, so they share the writing: the shard's tensors are dealt out, largest first, to
  the least loaded rank, and data-parallel rank d writes its share to `tp<t>_pp<p>_dp<d>.safetensors`
  (possibly empty). Every rank writes about 1/dp of the shard's EMA instead of data-parallel rank 0
  writing it all (about as many bytes as the model file it also writes).
- `per_shard` (checkpoints written before `split`): one `tp<t>_pp<p>.safetensors` per shard.
- `per_rank` (ZeRO-3): every rank's partitions, `rank_<r>.safetensors`.
A reader needs only the manifest's rank table: a shard's tensors are the union of its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from prime_scale.checkpoint.layout import Coords
from prime_scale.errors import UserError

EMA_DIR = "ema"
EMA_SPLIT, EMA_PER_SHARD, EMA_PER_RANK = "split", "per_shard", "per_rank"


def ema_file(c: Coords, mode: str) -> str:
    """The EMA file rank c writes (split, per_rank) or its shard's one file (per_shard)."""
    if mode == EMA_PER_RANK:
        return f"rank_{c.rank:05d}.safetensors"
    if mode == EMA_SPLIT:
        return f"tp{c.tp:02d}_pp{c.pp:02d}_dp{c.dp:03d}.safetensors"
    return f"tp{c.tp:02d}_pp{c.pp:02d}.safetensors"


def shard_files(manifest: dict, tp: int, pp: int) -> list[str]:
    """The files (relative to ema/) that together hold the EMA of model-parallel shard (tp, pp);
    for per_rank, in data-parallel order."""
    mode = manifest["ema"]
    ranks = sorted((r["dp"], r["rank"]) for r in manifest["ranks"] if r["tp"] == tp and r["pp"] == pp)
    if mode == EMA_PER_SHARD:
        return [ema_file(Coords(0, 0, tp, 0, pp, 0, 0, 0), mode)]
    return [ema_file(Coords(rank, 0, tp, 0, pp, 0, dp, 0), mode) for dp, rank in ranks]


def shares(nbytes: Mapping[str, int], dp_size: int) -> dict[str, int]:
    """Which data-parallel rank writes each tensor: largest first to the least loaded (ties: the lowest
    rank, then the name), so every rank of a shard computes the same deal."""
    load = [0] * dp_size
    out = {}
    for name in sorted(nbytes, key=lambda n: (-nbytes[n], n)):
        d = min(range(dp_size), key=lambda i: (load[i], i))
        out[name] = d
        load[d] += nbytes[name]
    return out


def save(folder: Path, c: Coords, engine, ema: Mapping[str, torch.Tensor], mode: str) -> Optional[Path]:
    """Write this rank's EMA file into folder/ema; returns it."""
    from safetensors.torch import save_file

    want = {}
    for name, p in engine.module.named_parameters():
        if mode == EMA_PER_RANK:
            want[name] = list(p.ds_tensor.shape)
        else:
            want[name] = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
    missing = sorted(set(want) - set(ema))
    extra = sorted(set(ema) - set(want))
    if missing or extra:
        raise UserError(f"rank {c.rank}: EMA weights do not match the model's parameters "
                        f"(missing: {missing[:5]}, unknown: {extra[:5]})")
    for name, t in ema.items():
        if list(t.shape) != want[name]:
            what = "this rank's ZeRO-3 partition" if mode == EMA_PER_RANK else "the full TP-local tensor"
            raise UserError(f"rank {c.rank}: EMA tensor {name} has shape {list(t.shape)}, {what} is {want[name]}")
    names = list(ema)
    if mode == EMA_SPLIT:
        deal = shares({n: ema[n].numel() * ema[n].element_size() for n in names}, c.dp_size)
        names = [n for n in names if deal[n] == c.dp]
    tensors = {n: ema[n].detach().to("cpu").contiguous() for n in names}
    (folder / EMA_DIR).mkdir(exist_ok=True)
    path = folder / EMA_DIR / ema_file(c, mode)
    save_file(tensors, str(path))
    return path


def load(folder: Path, manifest: dict, c: Coords) -> dict:
    """Rank c's EMA weights as save() was given them (its shard's tensors; ZeRO-3: its partitions)."""
    from safetensors.torch import load_file

    mode = manifest["ema"]
    if mode == EMA_PER_RANK:
        return load_file(str(folder / EMA_DIR / ema_file(c, mode)))
    out = {}
    for name in shard_files(manifest, c.tp, c.pp):
        out.update(load_file(str(folder / EMA_DIR / name)))
    return out
