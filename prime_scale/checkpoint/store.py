"""Saving, publishing and loading training checkpoints of a DeepSpeed engine.

save() is collective (every rank calls it). All ranks write into `<dir>/step_<N>.tmp-<nonce>`:
DeepSpeed's own files (model, optimizer, LR schedule; sharded as the engine is), our per-rank extra
state (data-loader position, RNG streams, counters) and, once per model-parallel shard, the EMA
weights. After a barrier rank 0 writes the manifest (layout, recipe, tokenizer identity, the TP
partition of every parameter, every file with its size), renames the folder to `step_<N>`, points
`latest` at it and applies keep-last-k retention. A crash before the rename leaves only a `.tmp-`
folder, which is never loaded and is deleted by the next save.

load() is collective too. It refuses a checkpoint written under another layout (DeepSpeed's
optimizer shards only fit the layout that wrote them) with a message that says how to continue,
and it loads every file weights-only.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from prime_scale.checkpoint import manifest as mf
from prime_scale.checkpoint import rng, safe_load
from prime_scale.checkpoint.shards import partition_info
from prime_scale.errors import UserError

EXTRA_DIR = "extra"
EMA_DIR = "ema"
EMA_PER_SHARD, EMA_PER_RANK = "per_shard", "per_rank"
LAYOUT_DIR = "layout"
TOKENIZER_DIR = "tokenizer"

NameMap = Union[None, Mapping[str, str], Callable[[str], str]]


class TopologyChanged(UserError):
    """The checkpoint was written under another (TP, PP, DP, ZeRO, precision) layout."""


@dataclasses.dataclass
class Coords:
    """Where this rank sits in the layout."""
    rank: int
    world: int
    tp: int
    tp_size: int
    pp: int
    pp_size: int
    dp: int
    dp_size: int

    def layout(self) -> dict:
        return {"world_size": self.world, "tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size}


@dataclasses.dataclass
class Restored:
    """What load() brings back besides the engine state."""
    path: Path
    step: int
    extra: dict           # this rank's extra_state as given to save()
    ema: Optional[dict]   # this rank's EMA weights (local names; ZeRO-3: its partitions), if saved
    manifest: dict


# --------------------------------------------------------------------------- layout of an engine


def coords(engine) -> Coords:
    """This rank's (tp, pp, dp) coordinates, from the pipeline grid or the engine's mpu."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grid = getattr(engine, "grid", None)
    if grid is not None:  # DeepSpeed's PipelineEngine
        return Coords(rank, world, grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size(),
                      grid.get_pipe_parallel_rank(), grid.get_pipe_parallel_world_size(),
                      grid.get_data_parallel_rank(), grid.get_data_parallel_world_size())
    mpu = getattr(engine, "mpu", None)
    if mpu is None:
        return Coords(rank, world, 0, 1, 0, 1, rank, world)

    def ask(name: str, default: int) -> int:
        fn = getattr(mpu, name, None)
        return int(fn()) if fn is not None else default

    return Coords(rank, world,
                  ask("get_tensor_model_parallel_rank", 0), ask("get_tensor_model_parallel_world_size", 1),
                  ask("get_pipeline_model_parallel_rank", 0), ask("get_pipeline_model_parallel_world_size", 1),
                  ask("get_data_parallel_rank", rank), ask("get_data_parallel_world_size", world))


def engine_layout(engine) -> dict:
    c = coords(engine)
    return {**c.layout(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32"),
            "pipeline": getattr(engine, "grid", None) is not None}


def _canonical(name_map: NameMap, local: str) -> str:
    if name_map is None:
        return local
    if callable(name_map):
        return name_map(local)
    return name_map.get(local, local)


def _persistent_buffers(module: torch.nn.Module, prefix: str = ""):
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, buf
    for name, child in module.named_children():
        yield from _persistent_buffers(child, prefix + name + ".")


def _layer_files(engine) -> dict[str, tuple[str, str]]:
    """Pipeline engine: local name -> (layer file, key in it) for every parameter and buffer."""
    module = engine.module
    if getattr(engine, "grid", None) is None or not hasattr(module, "forward_funcs"):
        return {}
    where = {}
    for local_idx, layer in enumerate(module.forward_funcs):
        if not isinstance(layer, torch.nn.Module):
            continue
        fname = os.path.basename(module.ckpt_layer_path("", local_idx))
        prefix = f"{local_idx + module._local_start}."
        for key in layer.state_dict().keys():
            where[prefix + key] = (fname, key)
    return where


def _param_table(engine, name_map: NameMap, unpadded: Mapping[str, int]) -> dict:
    """What the converter needs to rebuild full tensors without model code: every parameter's local
    (DeepSpeed) name, canonical name, TP-local shape, megatron partitioning, and the true size along
    the partition dim of tensors padded to a multiple of the TP degree (vocabulary rows)."""
    layer_files = _layer_files(engine)
    params = []
    for local, p in engine.module.named_parameters():
        dim, stride = partition_info(p)
        shape = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
        name = _canonical(name_map, local)
        entry = {"local": local, "name": name, "shape": shape,
                 "dtype": str(p.dtype).removeprefix("torch."), "partition_dim": dim, "partition_stride": stride}
        if name in unpadded:
            entry["unpadded_size"] = int(unpadded[name])
        if local in layer_files:
            entry["layer_file"], entry["layer_key"] = layer_files[local]
        params.append(entry)
    buffers = []
    for local, b in _persistent_buffers(engine.module):
        entry = {"local": local, "name": _canonical(name_map, local), "shape": list(b.shape),
                 "dtype": str(b.dtype).removeprefix("torch.")}
        if local in layer_files:
            entry["layer_file"], entry["layer_key"] = layer_files[local]
        buffers.append(entry)
    return {"params": params, "buffers": buffers}


# --------------------------------------------------------------------------- collective helpers


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shared_nonce() -> str:
    # from the OS, not from torch/python/numpy RNG: saving must not move any training stream
    value = torch.tensor([secrets.randbits(62) if dist.get_rank() == 0 else 0], dtype=torch.int64, device=_device())
    dist.broadcast(value, src=0)
    return f"{int(value.item()):x}"


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _on_every_rank(what: str, fn: Callable[[], None]) -> None:
    """Run fn on this rank; if it fails on any rank, every rank raises (instead of the others
    waiting forever at the next barrier)."""
    error = None
    try:
        fn()
    except Exception as e:  # re-raised below, on this rank, after the others have heard of it
        error = e
    if not _all_ok(error is None):
        if error is not None:
            raise error
        raise UserError(f"{what} failed on another rank (see its error)")


def _weights_only_problem(obj) -> Optional[str]:
    """None if obj survives a weights-only round trip, else why not (caught at save, not at resume)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as e:
        return safe_load.detail(e)
    return None


# --------------------------------------------------------------------------- tokenizer identity


def _tokenizer_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    raise UserError(f"tokenizer {path}: no such file or directory (recorded in the checkpoint as the run's "
                    "tokenizer)")


def tokenizer_identity(path: Union[str, Path]) -> dict:
    """sha256 over the tokenizer's files (names and contents): equal identities decode alike."""
    path = Path(path)
    h = hashlib.sha256()
    files = _tokenizer_files(path)
    base = path if path.is_dir() else path.parent
    for f in files:
        h.update(str(f.relative_to(base)).encode() + b"\0")
        h.update(f.read_bytes())
    return {"source": str(path.resolve()), "files": [str(f.relative_to(base)) for f in files],
            "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- save


def save(engine, ckpt_dir: Union[str, Path], step: int, *, extra_state: Optional[dict] = None,
         ema: Optional[Mapping[str, torch.Tensor]] = None, meta: Optional[dict] = None,
         keep_last: Optional[int] = None, name_map: NameMap = None,
         unpadded: Optional[Mapping[str, int]] = None) -> Path:
    """Save and publish checkpoint `step_<step>` of `engine` under ckpt_dir. Collective.

    extra_state: this rank's own state (data-loader position, counters, ...); RNG streams are added
        automatically. Must hold only tensors, containers and primitives (it is loaded weights-only).
    ema: EMA weights keyed by the engine's local parameter names, with TP-local shapes, written once
        per model-parallel shard (by data-parallel rank 0); under ZeRO-3, this rank's partitions
        (the shapes of the parameters' ds_tensor), written by every rank.
    meta: `recipe` (resolved recipe dict), `vocab_size`, `tokenizer` (path to the tokenizer file or
        directory: copied into the checkpoint and hashed); any other keys are kept under manifest["meta"].
    keep_last: after publishing, delete all but the newest keep_last complete checkpoints.
    name_map: local parameter name -> canonical name (mapping or function), so that pipeline and
        non-pipeline layouts of one model name their tensors alike in consolidated checkpoints.
    unpadded: canonical name -> true size along the partition dim, for tensors padded to a multiple
        of the TP degree (e.g. vocabulary rows); consolidation trims the padding, resharding re-pads.
    Returns the published folder.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = dict(meta or {})
    c = coords(engine)
    tag = mf.step_dir_name(step)
    tmp_tag = f"{tag}{mf.TMP_MARK}{_shared_nonce()}"
    tmp = ckpt_dir / tmp_tag

    payload = {"step": int(step), "extra": dict(extra_state or {}), "rng": rng.capture()}
    problem = _weights_only_problem(payload)
    if not _all_ok(problem is None):
        raise UserError(f"checkpoint step {step}: rank {c.rank}'s extra_state cannot be stored safely: "
                        f"{problem or 'see the error of another rank'}; keep it to tensors, containers, "
                        "numbers and strings")

    if c.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        mf.remove_stale(ckpt_dir)  # leftovers of a save or deletion that a crash interrupted
    dist.barrier()

    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"prime_scale_step": int(step)},
                           save_latest=False)

    ema_mode = None if ema is None else (EMA_PER_RANK if _zero3(engine) else EMA_PER_SHARD)

    def write_own_files():
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        torch.save(payload, tmp / EXTRA_DIR / f"rank_{c.rank:05d}.pt")
        (tmp / LAYOUT_DIR).mkdir(exist_ok=True)
        record = {**dataclasses.asdict(c), "mp_file_rank": int(getattr(engine, "checkpoint_mp_rank", 0))}
        if c.dp == 0:
            record.update(_param_table(engine, name_map, unpadded or {}))
        if ema_mode == EMA_PER_RANK or (ema_mode == EMA_PER_SHARD and c.dp == 0):
            _save_ema(tmp, c, engine, ema, ema_mode)
        (tmp / LAYOUT_DIR / f"rank_{c.rank:05d}.json").write_text(json.dumps(record))

    _on_every_rank(f"checkpoint step {step}: writing", write_own_files)  # also the barrier before publishing

    final = ckpt_dir / tag

    def publish():
        if c.rank == 0:
            _publish(engine, tmp, final, c, step, meta, ema_mode)
            if keep_last is not None:
                mf.apply_retention(ckpt_dir, keep_last)

    _on_every_rank(f"checkpoint step {step}: publishing", publish)
    return final


def _zero3(engine) -> bool:
    return int(engine.zero_optimization_stage()) == 3


def ema_file(c: Coords, mode: str) -> str:
    """EMA file of a rank: one per model-parallel shard, or (ZeRO-3 partitions) one per rank."""
    if mode == EMA_PER_RANK:
        return f"rank_{c.rank:05d}.safetensors"
    return f"tp{c.tp:02d}_pp{c.pp:02d}.safetensors"


def _save_ema(tmp: Path, c: Coords, engine, ema: Mapping[str, torch.Tensor], mode: str) -> None:
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
    tensors = {}
    for name, t in ema.items():
        if list(t.shape) != want[name]:
            what = "this rank's ZeRO-3 partition" if mode == EMA_PER_RANK else "the full TP-local tensor"
            raise UserError(f"rank {c.rank}: EMA tensor {name} has shape {list(t.shape)}, {what} is {want[name]}")
        tensors[name] = t.detach().to("cpu").contiguous()
    (tmp / EMA_DIR).mkdir(exist_ok=True)
    save_file(tensors, str(tmp / EMA_DIR / ema_file(c, mode)))


def _publish(engine, tmp: Path, final: Path, c: Coords, step: int, meta: dict, ema_mode: Optional[str]) -> None:
    """Rank 0: manifest, then rename into place, then the `latest` pointer."""
    records = [json.loads(p.read_text()) for p in sorted((tmp / LAYOUT_DIR).glob("rank_*.json"))]
    if len(records) != c.world:
        raise RuntimeError(f"{tmp}: {len(records)} of {c.world} ranks wrote their layout record "
                           "(a shared filesystem is required for multi-node checkpoints)")
    shutil.rmtree(tmp / LAYOUT_DIR)
    shards = [{k: r[k] for k in ("tp", "pp", "mp_file_rank", "params", "buffers")}
              for r in records if r["dp"] == 0]
    ranks = [{k: r[k] for k in ("rank", "tp", "pp", "dp", "mp_file_rank")} for r in records]

    tokenizer = None
    src = meta.pop("tokenizer", None)
    if src is not None:
        src = Path(src)
        tokenizer = tokenizer_identity(src)
        dst = tmp / TOKENIZER_DIR
        dst.mkdir()
        base = src if src.is_dir() else src.parent
        for rel in tokenizer["files"]:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / rel, dst / rel)
        tokenizer["copy"] = TOKENIZER_DIR

    manifest = {
        "format": mf.FORMAT, "version": mf.VERSION,
        "step": int(step), "tag": final.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": engine_layout(engine),
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
        "shards": sorted(shards, key=lambda s: (s["pp"], s["tp"])),
        "ema": ema_mode,
        "recipe": meta.pop("recipe", None),
        "vocab_size": meta.pop("vocab_size", None),
        "tokenizer": tokenizer,
        "meta": meta,
        "files": mf.list_files(tmp),
    }
    mf.write_atomic(tmp / mf.MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():  # the same step saved again (e.g. right after a resume): replace it
        mf.remove_tree(final)
    os.replace(tmp, final)
    mf.fsync_dir(final.parent)
    mf.write_atomic(final.parent / mf.LATEST, final.name)


# --------------------------------------------------------------------------- load


def check_layout(manifest: dict, layout: dict, path: Path) -> None:
    """TopologyChanged unless the checkpoint's layout is this engine's layout."""
    saved = manifest["layout"]
    keys = ("tp", "pp", "dp", "zero_stage", "precision")
    if all(saved.get(k) == layout.get(k) for k in keys):
        return

    def show(d: dict) -> str:
        return f"tp={d['tp']} pp={d['pp']} dp={d['dp']} zero_stage={d['zero_stage']} precision={d['precision']}"

    raise TopologyChanged(
        f"{path} was written with {show(saved)}; this run has {show(layout)}. The optimizer state in a "
        f"DeepSpeed checkpoint is sharded for the layout that wrote it, so it cannot be resumed exactly "
        f"here. Either launch with the original layout, or convert it (prime-scale convert {path} --out DIR) "
        f"and start the new layout from those weights (fresh optimizer state).")


def load(engine, ckpt_dir: Union[str, Path], tag: Optional[str] = None, *, restore_rng: bool = True,
         load_optimizer: bool = True) -> Restored:
    """Load a complete checkpoint into `engine` (collective). tag None: the newest complete one.
    Restores this rank's RNG streams (unless restore_rng=False) and returns its extra state."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        folder = mf.find_latest_complete(ckpt_dir)
        if folder is None:
            raise UserError(f"{ckpt_dir}: no complete checkpoint to resume from")
    else:
        folder = ckpt_dir / tag
    manifest = mf.read_manifest(folder)
    c = coords(engine)
    check_layout(manifest, engine_layout(engine), folder)

    try:
        with safe_load.weights_only_loading():
            path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                             load_optimizer_states=load_optimizer,
                                             load_lr_scheduler_states=load_optimizer)
    except pickle.UnpicklingError as e:  # DeepSpeed does not say which file: name the checkpoint
        raise safe_load.refusal(folder, e) from None
    payload = safe_load.load(folder / EXTRA_DIR / f"rank_{c.rank:05d}.pt")
    if path is None:
        raise UserError(f"{folder}: DeepSpeed found no model files for this rank (rank {c.rank})")

    ema = None
    if manifest.get("ema"):
        from safetensors.torch import load_file

        ema = load_file(str(folder / EMA_DIR / ema_file(c, manifest["ema"])))
    if restore_rng:
        rng.restore(payload["rng"])
    return Restored(path=folder, step=int(payload["step"]), extra=payload["extra"], ema=ema, manifest=manifest)
