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

from prime_scale import fsio
from prime_scale.checkpoint import catalog as mf
from prime_scale.checkpoint import rng, safe_load
from prime_scale.checkpoint.layout import Coords, check_layout, coords, engine_layout, param_table
from prime_scale.data.tokenizer import copy_tokenizer_files, tokenizer_identity
from prime_scale.errors import UserError
from prime_scale.model.naming import NameMap
from prime_scale.parallel.state import collective_device

EXTRA_DIR = "extra"
EMA_DIR = "ema"
EMA_PER_SHARD, EMA_PER_RANK = "per_shard", "per_rank"
LAYOUT_DIR = "layout"
TOKENIZER_DIR = "tokenizer"

@dataclasses.dataclass
class Restored:
    """What load() brings back besides the engine state."""
    path: Path
    step: int
    extra: dict           # this rank's extra_state as given to save()
    ema: Optional[dict]   # this rank's EMA weights (local names; ZeRO-3: its partitions), if saved
    manifest: dict


# --------------------------------------------------------------------------- collective helpers


def _shared_nonce() -> str:
    # from the OS, not from torch/python/numpy RNG: saving must not move any training stream
    value = torch.tensor([secrets.randbits(62) if dist.get_rank() == 0 else 0], dtype=torch.int64, device=collective_device())
    dist.broadcast(value, src=0)
    return f"{int(value.item()):x}"


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def on_every_rank(what: str, fn: Callable[[], None]) -> None:
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


# --------------------------------------------------------------------------- save


def save(engine, ckpt_dir: Union[str, Path], step: int, *, extra_state: Optional[dict] = None,
         ema: Optional[Mapping[str, torch.Tensor]] = None, meta: Optional[dict] = None,
         keep_last: Optional[int] = None, name_map: NameMap = None,
         unpadded: Optional[Mapping[str, int]] = None, where: Optional[Coords] = None,
         protect: tuple = ()) -> Path:
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
    where: this rank's coordinates (the trainer's ParallelState); default: asked of the engine.
    protect: checkpoint names retention must not delete (found damaged: kept for the user).
    Returns the published folder. A full disk is a UserError naming the intact previous checkpoint;
    the partial save is removed.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = dict(meta or {})
    c = where or coords(engine)
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
    try:
        return _save_into(engine, tmp, ckpt_dir / tag, c, step, payload, ema, meta, keep_last, name_map,
                          unpadded, protect)
    except Exception as e:
        full = _out_of_space(e, ckpt_dir)  # before the clean-up frees what the partial save took
        if c.rank == 0:  # every rank has stopped writing (each phase ends in a collective): clean up
            shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        previous = mf.find_latest_complete(ckpt_dir)
        intact = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"no space left on the device while saving checkpoint step {step} to {ckpt_dir} ({full}); "
                        f"the partial save was removed and {intact}. Free space (or set checkpoint.dir "
                        "elsewhere), then continue with --resume auto") from None


def _out_of_space(error: BaseException, ckpt_dir: Path) -> Optional[str]:
    """A description of the free space when `error` is (or looks like) a full disk, else None.
    torch.save reports ENOSPC as a bare 'iostream error' RuntimeError: ask the filesystem too."""
    import errno

    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    no_space = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    # torch's writers turn ENOSPC into RuntimeErrors ('iostream error', 'unexpected pos …'): a write
    # failure on a filesystem with (almost) nothing left is taken for what it is
    if no_space or (isinstance(error, RuntimeError) and free is not None and free < (64 << 20)):
        return f"{free / (1 << 20):.1f} MiB free" if free is not None else "free space unknown"
    return None


def _save_into(engine, tmp: Path, final: Path, c: Coords, step: int, payload: dict, ema, meta: dict,
               keep_last, name_map, unpadded, protect) -> Path:
    """The phases of a save, each ending in a collective that every rank reaches even on failure."""
    ckpt_dir = final.parent

    def deepspeed_files():
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"prime_scale_step": int(step)},
                               save_latest=False)

    on_every_rank(f"checkpoint step {step}: writing DeepSpeed's files", deepspeed_files)

    ema_mode = None if ema is None else (EMA_PER_RANK if _zero3(engine) else EMA_PER_SHARD)

    def write_own_files():
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        torch.save(payload, tmp / EXTRA_DIR / f"rank_{c.rank:05d}.pt")
        (tmp / LAYOUT_DIR).mkdir(exist_ok=True)
        record = {**dataclasses.asdict(c), "mp_file_rank": int(getattr(engine, "checkpoint_mp_rank", 0))}
        if c.dp == 0:
            record.update(param_table(engine, name_map, unpadded or {}))
        if ema_mode == EMA_PER_RANK or (ema_mode == EMA_PER_SHARD and c.dp == 0):
            _save_ema(tmp, c, engine, ema, ema_mode)
        (tmp / LAYOUT_DIR / f"rank_{c.rank:05d}.json").write_text(json.dumps(record))

    on_every_rank(f"checkpoint step {step}: writing", write_own_files)

    def hash_own_share():  # every rank hashes and flushes a share of the files: the work spreads
        files = mf.relative_files(tmp, skip=(LAYOUT_DIR,))
        records = mf.describe_files(tmp, files[c.rank::c.world])
        (tmp / LAYOUT_DIR / f"files_{c.rank:05d}.json").write_text(json.dumps(records))

    on_every_rank(f"checkpoint step {step}: hashing", hash_own_share)  # also the barrier before publishing

    def publish():
        if c.rank == 0:
            _publish(engine, tmp, final, c, step, meta, ema_mode)
            if keep_last is not None:
                mf.apply_retention(ckpt_dir, keep_last, protect)

    on_every_rank(f"checkpoint step {step}: publishing", publish)
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
    files = [e for p in sorted((tmp / LAYOUT_DIR).glob("files_*.json")) for e in json.loads(p.read_text())]
    shutil.rmtree(tmp / LAYOUT_DIR)
    shards = [{k: r[k] for k in ("tp", "pp", "mp_file_rank", "params", "buffers")}
              for r in records if r["dp"] == 0]
    ranks = [{k: r[k] for k in ("rank", "tp", "pp", "dp", "mp_file_rank")} for r in records]

    tokenizer = None
    src = meta.pop("tokenizer", None)
    if src is not None:
        src = Path(src)
        tokenizer = tokenizer_identity(src)
        copy_tokenizer_files(src, tokenizer["files"], tmp / TOKENIZER_DIR)
        tokenizer["copy"] = TOKENIZER_DIR
    listed = {e["path"] for e in files}
    files += mf.describe_files(tmp, [p for p in mf.relative_files(tmp) if p not in listed])  # the tokenizer copy

    manifest = {
        "format": mf.FORMAT, "version": mf.VERSION,
        "step": int(step), "tag": final.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": engine_layout(engine, c),
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
        "shards": sorted(shards, key=lambda s: (s["pp"], s["tp"])),
        "ema": ema_mode,
        "recipe": meta.pop("recipe", None),
        "vocab_size": meta.pop("vocab_size", None),
        "tokenizer": tokenizer,
        "meta": meta,
        "files": sorted(files, key=lambda e: e["path"]),
    }
    fsio.write_atomic(tmp / mf.MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():  # the same step saved again (e.g. right after a resume): replace it
        problems = mf.damage(final)
        if problems:  # never delete a damaged checkpoint: it may be what the user investigates
            aside = mf.set_aside(final)
            print(f"warning: {final} was damaged ({problems[0]}); kept as {aside.name}", flush=True)
        else:
            mf.remove_tree(final)
    os.replace(tmp, final)
    fsio.fsync_dir(final.parent)
    fsio.write_atomic(final.parent / mf.LATEST, final.name)


# --------------------------------------------------------------------------- load


def load(engine, ckpt_dir: Union[str, Path], tag: Optional[str] = None, *,
         where: Optional[Coords] = None) -> Restored:
    """Load a complete checkpoint into `engine` (collective). tag None: the newest complete one.
    Restores this rank's RNG streams and returns its extra state. where: as for save()."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        folder = mf.find_latest_complete(ckpt_dir)
        if folder is None:
            raise UserError(f"{ckpt_dir}: no complete checkpoint to resume from")
    else:
        folder = ckpt_dir / tag
    manifest = mf.read_manifest(folder)
    c = where or coords(engine)
    check_layout(manifest, engine_layout(engine, c), folder)

    try:
        with safe_load.weights_only_loading():
            path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    except pickle.UnpicklingError as e:  # DeepSpeed does not say which file: name the checkpoint
        raise safe_load.refusal(folder, e) from None
    payload = safe_load.load(folder / EXTRA_DIR / f"rank_{c.rank:05d}.pt")
    if path is None:
        raise UserError(f"{folder}: DeepSpeed found no model files for this rank (rank {c.rank})")

    ema = None
    if manifest.get("ema"):
        from safetensors.torch import load_file

        ema = load_file(str(folder / EMA_DIR / ema_file(c, manifest["ema"])))
    rng.restore(payload["rng"])
    return Restored(path=folder, step=int(payload["step"]), extra=payload["extra"], ema=ema, manifest=manifest)
