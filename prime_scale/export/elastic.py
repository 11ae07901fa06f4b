"""Resume a checkpoint under another layout: other TP, PP or DP sizes, another ZeRO stage.

DeepSpeed's checkpoint files are sharded for the layout that wrote them. Here every tensor this rank
holds is rebuilt from them by its canonical name, in full (export.reader joins the TP pieces, the
data-parallel partitions and pipeline stages of any layout), then cut for this rank's place in the
new layout (export.shards.take, padding vocabulary rows with zeros as the model does) and set into
the freshly built engine:
- the fp32 master weights (the module's weights are them, in the run's precision: never rebuilt from
  low-precision weights), both AdamW moments and AdamW's step count;
- the EMA weights;
- the LR schedule's position and DeepSpeed's step counters (global steps and samples, skipped steps);
- the trainer's counters and the data stream's position: the loader's state counts the samples of all
  ranks together, so the new data-parallel ranks continue the one global stream with no sample
  repeated or skipped (docs/data.md).
Not continued: the per-rank RNG streams. No continuation of them would give the uninterrupted run's
dropout masks (which rank draws for which sample changes with the layout), so every rank seeds its
streams afresh from (seed, step): seed_streams. Only dropout draws from them during training (the
Prime noise is keyed by seed, step and sample), so with model.dropout > 0 the masks differ from an
uninterrupted run's; resume_plan says so in the log.

Each rank reads the full tensors of its own pipeline stage (masters, moments and EMA: 16 bytes per
parameter, plus the largest tensor a few times over in memory); bench/bench_reshard.py measures it.
Supported under both layouts: fp32 and bf16 under ZeRO 0, 1 and 2 (DeepSpeed's ZeRO 1/2 optimizer,
its bf16 optimizer, torch's AdamW under ZeRO 0), pipelines included. ZeRO 3, and bf16 under ZeRO 0
without a pipeline (DeepSpeed's fp16-style optimizer), are refused with what to do instead.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Optional

import torch

from prime_scale.checkpoint import safe_load
from prime_scale.checkpoint.layout import LAYOUT_KEYS, TopologyChanged, show_layout
from prime_scale.errors import UserError
from prime_scale.export import reader as rd
from prime_scale.export import shards
from prime_scale.model.naming import canonical_name, name_map, partition_info, persistent_buffers, unpadded_sizes

CONVERT = ("or convert it (prime-scale convert {path} --out DIR) and start this layout from its weights with "
           "--init-from (fresh optimizer state, step 0)")


def unsupported_reason(layout: dict) -> Optional[str]:
    """Why a layout's optimizer state cannot be resharded (None: it can)."""
    if layout["zero_stage"] == 3:
        return "ZeRO 3 partitions every parameter itself"
    if layout["zero_stage"] == 0 and layout["precision"] != "fp32" and not layout.get("pipeline"):
        return f"{layout['precision']} under ZeRO 0 without a pipeline keeps DeepSpeed's fp16-style optimizer state"
    return None


def resume_plan(saved: dict, now: dict, dropout: float, path: Path) -> list[str]:
    """What resuming checkpoint `path` of layout `saved` under layout `now` changes, line by line for
    the log; raises TopologyChanged when it cannot be done."""
    for which, layout in (("the checkpoint's", saved), ("this run's", now)):
        why = unsupported_reason(layout)
        if why:
            raise TopologyChanged(f"{path}: resuming under another layout ({show_layout(saved)} -> "
                                  f"{show_layout(now)}) is not supported for {which} layout: {why}. Launch with "
                                  f"the checkpoint's layout, " + CONVERT.format(path=path))
    changed = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in LAYOUT_KEYS if saved.get(k) != now.get(k))
    lines = [f"resuming under another layout ({changed}): resharding the fp32 master weights, Adam moments, EMA, "
             "LR schedule, step counters and the data position"]
    if saved.get("precision") != now.get("precision"):
        lines.append(f"  precision {saved.get('precision')} -> {now.get('precision')}: masters and moments carry "
                     "over exactly; the arithmetic from here on is the new precision's")
    if dropout > 0:
        lines.append(f"  not continued: the RNG streams (model.dropout={dropout:g}): each rank draws fresh dropout "
                     "masks (seeded from the seed and the step), so the losses follow the uninterrupted run "
                     "statistically, not value for value")
    else:
        lines.append("  RNG streams start fresh: nothing in training draws from them (model.dropout = 0)")
    return lines


class _Targets:
    """This rank's tensors in the new layout, each with the source tensor it is cut from."""

    def __init__(self, module: torch.nn.Module, manifest: dict, folder: Path, vocab_size: int, tp: int):
        names = name_map(module)
        plans = {p.name: p for p in rd.plan(manifest)}
        unpadded = unpadded_sizes(module, vocab_size)
        self.params, self.buffers = [], []
        for kind, items in (("param", list(module.named_parameters())), ("buffer", list(persistent_buffers(module)))):
            for local, tensor in items:
                name = canonical_name(names, local)
                plan = plans.get(name)
                if plan is None or plan.kind != kind:
                    raise UserError(f"{folder}: holds no {kind} {name} (this run's {local}): the checkpoint is "
                                    "of another model")
                dim, stride = partition_info(tensor) if kind == "param" else (None, 1)
                want = list(tensor.shape)
                if dim is not None:
                    want[dim] = unpadded.get(name, want[dim] * tp)
                if list(plan.shape) != want:
                    raise UserError(f"{folder}: {name} has full shape {list(plan.shape)}, this run's model needs "
                                    f"{want}: the checkpoint is of another model shape")
                (self.params if kind == "param" else self.buffers).append((local, tensor, plan, dim, stride))


def _cut(full: torch.Tensor, like: torch.Tensor, dim, stride, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of `full`, in fp32 and in storage of its own: a piece that is a view would keep
    the whole tensor alive as optimizer state (and torch.save would write all of it)."""
    local_size = like.shape[dim] if dim is not None else None
    return shards.take(full, list(full.shape), dim, tp_rank, tp, stride, local_size).to(torch.float32, copy=True)


def _optimizer_kind(ds) -> str:
    """How the engine's optimizer holds its state: 'partitioned' (DeepSpeed's ZeRO 1/2 and bf16
    optimizers: a flat fp32 partition per group, reached per parameter through _hp_mapping) or
    'torch' (ZeRO 0 in fp32: torch's AdamW over the module's own parameters)."""
    params = list(ds.module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        raise TopologyChanged("resuming a checkpoint under a new ZeRO-3 layout is not supported")
    if any(getattr(p, "_hp_mapping", None) is not None for p in params):
        return "partitioned"
    held = {id(p) for g in ds.optimizer.param_groups for p in g["params"]}
    if isinstance(ds.optimizer, torch.optim.Optimizer) and all(id(p) in held for p in params):
        return "torch"
    raise TopologyChanged(f"resuming under this layout is not supported: its optimizer "
                          f"({type(ds.optimizer).__name__}) holds copies of the weights prime-scale cannot set")


def _open_partitioned_state(ds, step: float) -> None:
    """DeepSpeed's partitioned optimizers create AdamW's state at their first step and then link
    every parameter's fragment of it (_hp_mapping). Create it now, zero, with the step count, and link
    it the same way, so that the per-parameter setters below can fill it."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    base = ds.optimizer.optimizer  # the torch AdamW over the flat fp32 partitions
    by_group = collections.defaultdict(list)
    for p in ds.module.parameters():
        if getattr(p, "_hp_mapping", None) is not None:
            by_group[p._hp_mapping.param_group_index].append(p)
    for g, group in enumerate(base.param_groups):
        (flat,) = group["params"]
        base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                            **{key: torch.zeros_like(flat) for key in rd.MOMENTS}}
        lazy_init_hp_params_optimizer_state(by_group[g], flat, base.state)


@torch.no_grad()
def load_resharded(engine, folder: Path, manifest: dict, vocab_size: int) -> dict:
    """Set the checkpoint's state into `engine` (prime_scale.engine.Engine, built for the new layout).
    Rank-local: every rank reads what it needs. Returns the trainer's extra state (TrainState and
    the loader's state, as saved; the same on every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds, st = engine.ds, engine.state
    reader = rd.ShardedReader(folder, manifest)
    ema_reader = rd.ShardedReader(folder, manifest, weights="ema") if engine.ema is not None else None
    targets = _Targets(engine.module, manifest, folder, vocab_size, st.tp)
    kind = _optimizer_kind(ds)
    step = reader.adam_step()
    if kind == "partitioned" and step is not None:
        _open_partitioned_state(ds, step)
    device = st.device
    # EMA averages in the order WeightEMA keeps them (the module's parameters), filled one by one
    ema_index = {id(p): i for i, p in enumerate(engine.module.parameters())}
    for local, p, plan, dim, stride in targets.params:
        master = _cut(reader.full(plan), p, dim, stride, st.tp_rank, st.tp)
        p.data.copy_(master.to(p.dtype))  # the module's weights: the masters in the run's precision
        moments = {key: _cut(reader.full(plan, key), p, dim, stride, st.tp_rank, st.tp).to(device)
                   for key in rd.MOMENTS} if step is not None else None
        if kind == "partitioned":
            safe_set_full_fp32_param(p, master.to(device))
            for key, value in (moments or {}).items():
                safe_set_full_optimizer_state(p, value, key)
        elif moments is not None:
            ds.optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32), **moments}
        if ema_reader is not None:
            engine.ema.shadow[ema_index[id(p)]].copy_(_cut(ema_reader.full(plan), p, dim, stride, st.tp_rank, st.tp))
    for local, b, plan, dim, stride in targets.buffers:
        b.copy_(reader.full(plan).to(b.dtype))
    _restore_schedule(engine, reader.engine_state(), folder)
    return safe_load.load(folder / "extra" / "rank_00000.pt")["extra"]


def seed_streams(seed: int, step: int, par) -> None:
    """Fresh RNG streams for a run resumed under another layout: the layout's own seeding (parallel.state),
    from a seed moved by the step, so that the masks of the run's first steps are not drawn again."""
    from prime_scale.parallel.state import seed_everything

    seed_everything(seed + 1_000_003 * step, par)


def _restore_schedule(engine, saved: dict, folder: Path) -> None:
    """The LR schedule's position and DeepSpeed's counters. One learning rate drives every parameter
    group (optim.lr_factor), and the new layout may hold another number of groups (a pipeline stage
    without norms), so the schedule's per-group lists are rebuilt from the saved first entry."""
    sched, ds = engine.lr_scheduler, engine.ds
    src = saved.get("lr_scheduler")
    if not isinstance(src, dict) or "last_epoch" not in src:
        raise UserError(f"{folder}: no LR schedule state in the checkpoint's model file")
    if len(set(src["base_lrs"])) != 1 or len(set(src["_last_lr"])) != 1:
        raise UserError(f"{folder}: the LR schedule holds different rates per parameter group "
                        f"({src['_last_lr']}); prime-scale's schedule drives all groups alike")
    groups = len(ds.optimizer.param_groups)
    mine = sched.state_dict()
    mine.update(last_epoch=src["last_epoch"], _step_count=src.get("_step_count", mine.get("_step_count")),
                base_lrs=[src["base_lrs"][0]] * groups, _last_lr=[src["_last_lr"][0]] * groups)
    sched.load_state_dict(mine)
    for group in ds.optimizer.param_groups:
        group["lr"] = src["_last_lr"][0]
    ds.global_steps = int(saved["global_steps"])
    ds.global_samples = int(saved.get("global_samples") or 0)
    ds.skipped_steps = int(saved["skipped_steps"])
