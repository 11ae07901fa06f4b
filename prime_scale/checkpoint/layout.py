"""Where a checkpoint's pieces come from: the layout of the engine that wrote it.

Coords say where a rank sits (TP, PP, DP coordinates and sizes); the trainer builds them from its
ParallelState, a bare DeepSpeed engine is asked through its pipeline grid or mpu. The parameter
table records, per model-parallel shard, every tensor's local and canonical name, TP-local shape
and megatron partitioning (and, under fp32 ZeRO 0, its slot in the optimizer's state), so exports
and reshards need no model code. DeepSpeed's loader takes a checkpoint only under the layout that
wrote it (check_layout); export/elastic.py reshards it into any other.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from prime_scale.errors import UserError
from prime_scale.model.naming import NameMap, canonical_name, partition_info, persistent_buffers


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

    @classmethod
    def of(cls, par) -> "Coords":
        """From a ParallelState (prime_scale.parallel.state)."""
        return cls(par.rank, par.world_size, par.tp_rank, par.tp, par.pp_rank, par.pp, par.dp_rank, par.dp)



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


def engine_layout(engine, c: "Coords" = None) -> dict:
    c = c or coords(engine)
    return {**c.layout(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32"),
            "pipeline": getattr(engine, "grid", None) is not None}


def planned_layout(cfg, dp: int) -> dict:
    """The layout a recipe will run with dp data-parallel ranks, as engine_layout will report it."""
    from prime_scale.config import resolve_zero_stage

    p = cfg.parallel
    return {"world_size": p.tp * p.pp * dp, "tp": p.tp, "pp": p.pp, "dp": dp,
            "zero_stage": resolve_zero_stage(cfg, dp), "precision": cfg.precision, "pipeline": p.pp > 1}


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


def _optimizer_slots(engine) -> dict[int, int]:
    """ZeRO 0 in fp32, where torch's AdamW holds the module's own parameters: id(parameter) -> its
    index in the optimizer's state_dict (how a reshard finds its Adam moments). Empty otherwise."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return {}
    params = [p for g in getattr(engine.optimizer, "param_groups", []) for p in g["params"]]
    return {id(p): slot for slot, p in enumerate(params)}


def param_table(engine, name_map: NameMap, unpadded: Mapping[str, int]) -> dict:
    """What the converter needs to rebuild full tensors without model code: every parameter's local
    (DeepSpeed) name, canonical name, TP-local shape, megatron partitioning, and the true size along
    the partition dim of tensors padded to a multiple of the TP degree (vocabulary rows)."""
    layer_files = _layer_files(engine)
    slots = _optimizer_slots(engine)
    params = []
    for local, p in engine.module.named_parameters():
        dim, stride = partition_info(p)
        shape = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
        name = canonical_name(name_map, local)
        entry = {"local": local, "name": name, "shape": shape,
                 "dtype": str(p.dtype).removeprefix("torch."), "partition_dim": dim, "partition_stride": stride}
        if name in unpadded:
            entry["unpadded_size"] = int(unpadded[name])
        if local in layer_files:
            entry["layer_file"], entry["layer_key"] = layer_files[local]
        if id(p) in slots:
            entry["optim_slot"] = slots[id(p)]
        params.append(entry)
    buffers = []
    for local, b in persistent_buffers(engine.module):
        entry = {"local": local, "name": canonical_name(name_map, local), "shape": list(b.shape),
                 "dtype": str(b.dtype).removeprefix("torch.")}
        if local in layer_files:
            entry["layer_file"], entry["layer_key"] = layer_files[local]
        buffers.append(entry)
    return {"params": params, "buffers": buffers}



LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "precision")


def same_layout(saved: dict, now: dict) -> bool:
    """The checkpoint's files are sharded exactly as this engine's state is."""
    return all(saved.get(k) == now.get(k) for k in LAYOUT_KEYS)


def show_layout(d: dict) -> str:
    return " ".join(f"{k}={d.get(k)}" for k in LAYOUT_KEYS)


def check_layout(manifest: dict, layout: dict, path: Path) -> None:
    """TopologyChanged unless the checkpoint's layout is this engine's layout (what DeepSpeed's own
    loader, store.load, needs; `prime-scale train --resume` reshards other layouts, export/elastic.py)."""
    saved = manifest["layout"]
    if same_layout(saved, layout):
        return
    raise TopologyChanged(
        f"{path} was written with {show_layout(saved)}; this engine has {show_layout(layout)}. DeepSpeed's files "
        f"are sharded for the layout that wrote them, so they load only there: resume with `prime-scale train "
        f"--resume {path}`, which reshards them into the new layout (docs/checkpoints.md), or launch with the "
        f"original layout.")
