"""Saving, publishing and loading training checkpoints of a DeepSpeed engine.

save() is collective (every rank calls it). All ranks write into `<dir>/step_<N>.tmp-<nonce>`:
DeepSpeed's own files (model, optimizer, LR schedule; sharded as the engine is), our per-rank extra
state (data-loader position, RNG streams, counters) and the EMA weights (each data-parallel rank a
share of its shard's; ema_files.py). Every rank hashes and flushes the files it wrote itself
(writes.py records them), then rank 0 writes the manifest (layout, recipe, tokenizer identity, the TP
partition of every parameter, every file with its size, hash and writing rank), logs the save's bytes
and seconds per rank, renames the folder to `step_<N>`, points `latest` at it and applies keep-last-k
retention. A crash before the rename leaves only a `.tmp-` folder, which is never loaded and is
deleted by the next save. A write that fails on one rank, inside DeepSpeed's save or ours, ends the
save on every rank with an error (writes.py: no rank leaves DeepSpeed's collectives early), the
partial save removed and the previous checkpoint untouched.

load() is collective too. It refuses a checkpoint written under another layout (DeepSpeed's
optimizer shards only fit the layout that wrote them) with a message that says how to continue,
and it loads every file weights-only.
"""

from __future__ import annotations

import contextlib
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
from prime_scale.checkpoint import ema_files, rng, safe_load
from prime_scale.checkpoint.ema_files import EMA_PER_RANK, EMA_SPLIT
from prime_scale.checkpoint.layout import Coords, check_layout, coords, engine_layout, param_table
from prime_scale.checkpoint.writes import RankWrites, as_write_error
from prime_scale.data.tokenizer import copy_tokenizer_files, tokenizer_identity
from prime_scale.errors import UserError
from prime_scale.model.naming import NameMap
from prime_scale.parallel.state import collective_device

EXTRA_DIR = "extra"
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


class FailedElsewhere(UserError):
    """A collective step failed on another rank (which raised the error itself)."""


def _first_failed(failed: bool) -> Optional[int]:
    """The lowest rank for which `failed` holds, or None (one all-reduce)."""
    world = dist.get_world_size()
    flag = torch.tensor([dist.get_rank() if failed else world], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return None if int(flag.item()) >= world else int(flag.item())


def _all_ok(ok: bool) -> bool:
    return _first_failed(not ok) is None


def on_every_rank(what: str, fn: Callable[[], None]) -> None:
    """Run fn on this rank; if it fails on any rank, every rank raises (instead of the others
    waiting forever at the next barrier). fn must not itself run collectives that a failure on
    some ranks could skip."""
    error = None
    try:
        fn()
    except Exception as e:  # re-raised below, on this rank, after the others have heard of it
        error = e
    failed = _first_failed(error is not None)
    if failed is not None:
        if error is not None:
            raise error
        raise FailedElsewhere(f"{what} failed on rank {failed} (see its error)")


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
    ema: EMA weights keyed by the engine's local parameter names, with TP-local shapes (the data-
        parallel ranks of a shard write a share each); under ZeRO-3, this rank's partitions (the
        shapes of the parameters' ds_tensor), written by every rank.
    meta: `recipe` (resolved recipe dict), `vocab_size`, `tokenizer` (path to the tokenizer file or
        directory: copied into the checkpoint and hashed); any other keys are kept under manifest["meta"].
    keep_last: after publishing, delete all but the newest keep_last complete checkpoints.
    name_map: local parameter name -> canonical name (mapping or function), so that pipeline and
        non-pipeline layouts of one model name their tensors alike in consolidated checkpoints.
    unpadded: canonical name -> true size along the partition dim, for tensors padded to a multiple
        of the TP degree (e.g. vocabulary rows); consolidation trims the padding, resharding re-pads.
    where: this rank's coordinates (the trainer's ParallelState); default: asked of the engine.
    protect: checkpoint names retention must not delete (found damaged: kept for the user).
    Returns the published folder. A full disk or a failed write (on any rank) is a UserError on
    every rank naming the intact previous checkpoint; the partial save is removed.
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
        full = fsio.out_of_space(e, ckpt_dir)  # before the clean-up frees what the partial save took
        if c.rank == 0:  # every rank has stopped writing (each phase ends in a collective): clean up
            shutil.rmtree(tmp, ignore_errors=True)
        if full is None and not isinstance(e, (OSError, FailedElsewhere)):
            raise
        previous = mf.find_latest_complete(ckpt_dir)
        intact = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        if full is not None:
            raise UserError(f"no space left on the device while saving checkpoint step {step} to {ckpt_dir} "
                            f"({full}); the partial save was removed and {intact}. Free space (or set "
                            "checkpoint.dir elsewhere), then continue with --resume auto") from None
        if isinstance(e, FailedElsewhere):
            raise FailedElsewhere(f"{e}; the partial save was removed and {intact}") from None
        raise UserError(f"checkpoint step {step}: rank {c.rank} could not write {e.filename or 'its files'} "
                        f"({e.strerror or e}); the partial save was removed and {intact}. Check the storage "
                        f"of {ckpt_dir}, then continue with --resume auto") from None


def _save_into(engine, tmp: Path, final: Path, c: Coords, step: int, payload: dict, ema, meta: dict,
               keep_last, name_map, unpadded, protect) -> Path:
    """The phases of a save, each ending in a collective that every rank reaches even on failure."""
    ckpt_dir = final.parent
    writes = RankWrites(tmp)
    # An error DeepSpeed raises itself (not one of its writes, which writes.py defers) leaves the other
    # ranks in one of its collectives, which one unknown: this rank then joins no further collective
    # and leaves with the error; its exit ends the others' wait (gloo at once, NCCL at the group timeout).
    with writes.deepspeed_io(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"prime_scale_step": int(step)},
                               save_latest=False)
    on_every_rank(f"checkpoint step {step}: writing DeepSpeed's files", writes.raise_deferred)

    ema_mode = None if ema is None else (EMA_PER_RANK if _zero3(engine) else EMA_SPLIT)

    def write_own_files():
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        extra = tmp / EXTRA_DIR / f"rank_{c.rank:05d}.pt"
        try:
            torch.save(payload, extra)
        except RuntimeError as e:  # torch.save's way of saying the write failed
            raise as_write_error(e, extra) from e
        writes.wrote(extra)
        (tmp / LAYOUT_DIR).mkdir(exist_ok=True)
        record = {**dataclasses.asdict(c), "mp_file_rank": int(getattr(engine, "checkpoint_mp_rank", 0))}
        if c.dp == 0:
            record.update(param_table(engine, name_map, unpadded or {}))
        if ema_mode is not None:
            writes.wrote(ema_files.save(tmp, c, engine, ema, ema_mode))
        (tmp / LAYOUT_DIR / f"rank_{c.rank:05d}.json").write_text(json.dumps(record))

    on_every_rank(f"checkpoint step {step}: writing", write_own_files)

    def hash_own_files():
        # what this rank wrote, from its own page cache (never another node's files over the network)
        records = [{**r, "rank": c.rank} for r in mf.describe_files(tmp, writes.paths)]
        replaced = None
        if final.exists():  # the same step saved again: each rank checks the files it wrote of the old one
            replaced = (["found damaged before this save"] if final.name in protect
                        else mf.damage(final, (c.rank, c.world)))
        report = {"rank": c.rank, "bytes": sum(r["bytes"] for r in records), "seconds": round(writes.seconds(), 3),
                  "files": records, "replaced_damage": replaced}
        (tmp / LAYOUT_DIR / f"files_{c.rank:05d}.json").write_text(json.dumps(report))

    on_every_rank(f"checkpoint step {step}: hashing", hash_own_files)  # also the barrier before publishing

    def publish():
        if c.rank == 0:
            _publish(engine, tmp, final, c, step, meta, ema_mode)
            if keep_last is not None:
                mf.apply_retention(ckpt_dir, keep_last, protect)

    on_every_rank(f"checkpoint step {step}: publishing", publish)
    return final


def _zero3(engine) -> bool:
    return int(engine.zero_optimization_stage()) == 3


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.2f} MiB"


def save_figures(step: int, reports: list[dict]) -> str:
    """The log line of a save: what the ranks wrote, and the ranks that wrote most, least, slowest."""
    def one(r):
        return f"rank {r['rank']} wrote {_mib(r['bytes'])} in {r['seconds']:.2f} s"

    if len(reports) == 1:
        return f"checkpoint step {step}: {one(reports[0])}"
    most = max(reports, key=lambda r: (r["bytes"], -r["rank"]))
    least = min(reports, key=lambda r: (r["bytes"], r["rank"]))
    slowest = max(reports, key=lambda r: (r["seconds"], -r["rank"]))
    return (f"checkpoint step {step}: {len(reports)} ranks wrote {_mib(sum(r['bytes'] for r in reports))}; "
            f"most: {one(most)}; least: {one(least)}; slowest: {one(slowest)}")


def _publish(engine, tmp: Path, final: Path, c: Coords, step: int, meta: dict, ema_mode: Optional[str]) -> None:
    """Rank 0: manifest, then rename into place, then the `latest` pointer."""
    records = [json.loads(p.read_text()) for p in sorted((tmp / LAYOUT_DIR).glob("rank_*.json"))]
    if len(records) != c.world:
        raise RuntimeError(f"{tmp}: {len(records)} of {c.world} ranks wrote their layout record "
                           "(a shared filesystem is required for multi-node checkpoints)")
    reports = [json.loads(p.read_text()) for p in sorted((tmp / LAYOUT_DIR).glob("files_*.json"))]
    files = list({e["path"]: e for r in reversed(reports) for e in r["files"]}.values())  # a path once: the lowest rank's
    replaced_damage = [p for r in reports for p in (r["replaced_damage"] or [])]
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
        "writes": [{k: r[k] for k in ("rank", "bytes", "seconds")} for r in reports],
    }
    fsio.write_atomic(tmp / mf.MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():  # the same step saved again (e.g. right after a resume): replace it
        if replaced_damage:  # never delete a damaged checkpoint: it may be what the user investigates
            aside = mf.set_aside(final)
            print(f"warning: {final} was damaged ({replaced_damage[0]}); kept as {aside.name}", flush=True)
        else:
            mf.remove_tree(final)
    os.replace(tmp, final)
    fsio.fsync_dir(final.parent)
    fsio.write_atomic(final.parent / mf.LATEST, final.name)
    print(save_figures(step, reports), flush=True)


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
        with safe_load.weights_only_loading(), _refusals_name_the_file(engine.checkpoint_engine):
            path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    except pickle.UnpicklingError as e:  # a load outside DeepSpeed's checkpoint engine: name the checkpoint
        raise safe_load.refusal(folder, e) from None
    payload = safe_load.load(folder / EXTRA_DIR / f"rank_{c.rank:05d}.pt")
    if path is None:
        raise UserError(f"{folder}: DeepSpeed found no model files for this rank (rank {c.rank})")

    ema = ema_files.load(folder, manifest, c) if manifest.get("ema") else None
    rng.restore(payload["rng"])
    return Restored(path=folder, step=int(payload["step"]), extra=payload["extra"], ema=ema, manifest=manifest)


@contextlib.contextmanager
def _refusals_name_the_file(checkpoint_engine):
    """DeepSpeed loads every file of a checkpoint through its checkpoint engine and does not say
    which one a refused unpickling came from: name it (each rank loads its own optimizer partition,
    so only the rank that holds a bad file sees it)."""
    load = checkpoint_engine.load

    def named(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise safe_load.refusal(path, e) from None

    checkpoint_engine.load = named
    try:
        yield
    finally:
        checkpoint_engine.load = load
