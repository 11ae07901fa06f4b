"""Consolidate a sharded checkpoint of any layout into full tensors, one tensor at a time.

Where each parameter's values live depends on the layout that wrote the checkpoint:
- ZeRO 1/2, and bf16 under ZeRO 0 (DeepSpeed's bf16 optimizer): the fp32 master weights, flattened
  and cut into one partition per data-parallel rank (`*zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt`).
  The optimizer records, per parameter and rank, where its fragment sits in that rank's partition
  (`param_slice_mappings`); fragments follow the parameter's own element order rank by rank.
- ZeRO 3: the fp32 master weights, every parameter cut into dp pieces of ceil(numel/dp) elements,
  laid out rank by rank in the order of the model file's `param_shapes`.
- ZeRO 0 in fp32 (no master copy exists): the module weights, in `mp_rank_<mp>_model_states.pt`, or
  for the pipeline engine in its per-layer files `layer_<i>-model_<tp>-model_states.pt`.
- EMA weights: our own `ema/` files (checkpoint/ema_files.py): a model-parallel shard's tensors spread
  over its data-parallel ranks' files, one file per shard (older checkpoints), or ZeRO-3 partitions.
The manifest (written at save time) says which parameters each (tp, pp) shard holds, under which
local and canonical names, and how megatron split each across TP ranks; so no model code is needed.

Memory: files are memory-mapped and only the bytes of the tensor at hand are touched; mappings are
dropped once the bytes read through them exceed a budget of about one largest tensor. Peak memory is a
small multiple of the largest tensor, whatever the model size (bench/bench_convert.py measures it).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from pathlib import Path
from typing import Optional

import torch

from prime_scale.checkpoint import safe_load
from prime_scale.checkpoint import ema_files
from prime_scale.checkpoint.ema_files import EMA_DIR, EMA_PER_RANK
from prime_scale.errors import UserError
from prime_scale.export import shards
from prime_scale.export.untrusted import read_header

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
OSD = "optimizer_state_dict"
BASE = "base_optimizer_state"  # the torch optimizer's state_dict inside DeepSpeed's partitioned optimizers
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state besides its step count
MIN_BUDGET = 16 << 20  # bytes read through one set of mappings before they are dropped

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                                      torch.int64, torch.int32, torch.int16, torch.int8,
                                                      torch.uint8, torch.bool)}


@dataclasses.dataclass
class Piece:
    """One TP rank's part of a tensor, as stored."""
    tp: int
    pp: int
    mp_file_rank: int
    local: str
    shape: list[int]
    layer_file: Optional[str] = None
    layer_key: Optional[str] = None
    optim_slot: Optional[int] = None  # ZeRO 0 in fp32: the parameter's index in the optimizer's state_dict


@dataclasses.dataclass
class TensorPlan:
    name: str
    kind: str  # "param" | "buffer"
    shape: list[int]  # full shape
    dtype: torch.dtype  # dtype of the live tensor at save time
    partition_dim: Optional[int]  # megatron's split dim (recorded even at TP = 1); None: replicated
    stride: int
    pieces: list[Piece]  # by TP rank
    unpadded_size: Optional[int] = None  # true size along partition_dim (the rest is TP padding)

    @property
    def nbytes_fp32(self) -> int:
        return math.prod(self.shape) * 4


def plan(manifest: dict) -> list[TensorPlan]:
    """Every tensor of the consolidated model, in a layout-independent order (pipeline stage, then
    the stage's own order). A canonical name met again on a later stage (tied weights) is skipped."""
    tp_size = manifest["layout"]["tp"]
    by_stage = collections.defaultdict(dict)
    for s in manifest["shards"]:
        by_stage[s["pp"]][s["tp"]] = s
    plans: list[TensorPlan] = []
    seen = set()
    for pp in sorted(by_stage):
        stage = by_stage[pp]
        if sorted(stage) != list(range(tp_size)):
            raise UserError(f"manifest: pipeline stage {pp} has TP shards {sorted(stage)}, expected 0..{tp_size - 1}")
        for kind in ("params", "buffers"):
            tables = [{e["local"]: e for e in stage[t][kind]} for t in range(tp_size)]
            for entry in stage[0][kind]:
                if entry["name"] in seen:
                    continue
                seen.add(entry["name"])
                dim = entry.get("partition_dim")
                stride = entry.get("partition_stride", 1)
                pieces = []
                for t in range(tp_size):
                    e = tables[t].get(entry["local"])
                    if e is None:
                        raise UserError(f"manifest: {entry['local']} exists on TP rank 0 of stage {pp} "
                                        f"but not on TP rank {t}")
                    pieces.append(Piece(t, pp, stage[t]["mp_file_rank"], e["local"], e["shape"],
                                        e.get("layer_file"), e.get("layer_key"), e.get("optim_slot")))
                shape = list(entry["shape"])
                if dim is not None and tp_size > 1:
                    shape[dim] *= tp_size
                unpadded = entry.get("unpadded_size")
                if unpadded is not None:
                    if dim is None or not 0 < unpadded <= shape[dim]:
                        raise UserError(f"manifest: {entry['name']}: unpadded size {unpadded} does not fit "
                                        f"shape {shape} along partition dim {dim}")
                    shape[dim] = unpadded
                plans.append(TensorPlan(entry["name"], kind[:-1], shape, _DTYPES[entry["dtype"]],
                                        dim, stride, pieces, unpadded))
    return plans


class _Mapped:
    """Memory-mapped, weights-only loads of checkpoint files, dropped after `budget` bytes were read
    through them (dropping a mapping releases the pages it touched)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.cache: dict[Path, object] = {}
        self.read = 0

    def get(self, path: Path):
        if path not in self.cache:
            try:
                self.cache[path] = safe_load.load(path, mmap=True)
            except FileNotFoundError:
                raise UserError(f"{path}: missing checkpoint file") from None
        return self.cache[path]

    def safetensors(self, path: Path):
        if path not in self.cache:
            from safetensors import safe_open

            read_header(path, remedy=safe_load.RESTORE)  # the library's own errors name no file
            self.cache[path] = safe_open(str(path), framework="pt", device="cpu")
        return self.cache[path]

    def account(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.budget:
            self.cache.clear()
            self.read = 0


class ShardedReader:
    """Reads TP-local tensors of a checkpoint folder (one Piece at a time)."""

    def __init__(self, folder: Path, manifest: dict, weights: str = "raw", budget: int = MIN_BUDGET):
        if weights not in ("raw", "ema"):
            raise UserError(f"weights must be 'raw' or 'ema', got {weights!r}")
        if weights == "ema" and not manifest.get("ema"):
            raise UserError(f"{folder}: this checkpoint holds no EMA weights (the run had optim.ema = 0); "
                            "use --weights raw")
        self.folder = Path(folder)
        self.manifest = manifest
        self.weights = weights
        self.files = _Mapped(budget)
        self.pipeline = bool(manifest["layout"].get("pipeline"))
        self.optim_files: dict[int, list[Path]] = collections.defaultdict(list)
        for entry in manifest["files"]:
            m = OPTIM_RE.match(Path(entry["path"]).name)
            if m:
                self.optim_files[int(m.group(2))].append((int(m.group(1)), self.folder / entry["path"]))
        for mp, lst in self.optim_files.items():
            self.optim_files[mp] = [p for _, p in sorted(lst)]
        self._index: dict[int, dict] = {}
        self._ema_index: dict[tuple, dict] = {}  # (tp, pp) -> EMA tensor name -> its file

    # ---------------------------------------------------------------- index of the optimizer partitions

    def _mp_index(self, mp: int) -> Optional[dict]:
        """How the fp32 master weights of model-parallel rank mp are partitioned (None: no master copy)."""
        if mp in self._index:
            return self._index[mp]
        paths = self.optim_files.get(mp)
        if not paths:
            self._index[mp] = None
            return None
        first = safe_load.load(paths[0], mmap=True)[OSD]
        stage = int(first.get("zero_stage", 0))  # absent in the bf16 (ZeRO-0) optimizer
        if stage == 3:
            index = self._zero3_index(mp, paths, first)
        else:
            index = self._slice_index(paths)
        self._index[mp] = index
        del first
        return index

    def _slice_index(self, paths: list[Path]) -> dict:
        frags = collections.defaultdict(list)  # local name -> [(path, group, start, numel)] in dp order
        for path in paths:
            osd = safe_load.load(path, mmap=True)[OSD]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for name, addr in mapping.items():
                    frags[name].append((path, g, int(addr.start), int(addr.numel)))
            del osd
        return {"kind": "slices", "frags": dict(frags)}

    def _zero3_index(self, mp: int, paths: list[Path], first: dict) -> dict:
        model_file = self.folder / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        shapes = safe_load.load(model_file, mmap=True)["param_shapes"]
        dp = len(paths)
        group_sizes = [int(t.numel()) for t in first["fp32_flat_groups"]]
        offsets, off = {}, 0
        for group in shapes:
            for name, shape in group.items():
                numel = math.prod(shape)
                part = math.ceil(numel / dp)
                offsets[name] = (off, part, numel)
                off += part
        if off != sum(group_sizes):
            raise UserError(f"{paths[0]}: ZeRO-3 partition holds {sum(group_sizes)} elements, the parameter "
                            f"shapes need {off}: the checkpoint is inconsistent")
        return {"kind": "zero3", "paths": paths, "offsets": offsets, "group_sizes": group_sizes}

    # ---------------------------------------------------------------- reading one piece

    def read(self, plan_: TensorPlan, piece: Piece, state: Optional[str] = None) -> torch.Tensor:
        """One piece as stored: the weights (fp32 masters where a master copy exists), or with
        `state` one of AdamW's moments (MOMENTS; fp32, zeros before the optimizer's first step)."""
        if state is not None:
            if plan_.kind != "param" or state not in MOMENTS:
                raise ValueError(f"{plan_.name}: no optimizer state {state!r}")
            t = self._read_moment(piece, state)
        elif self.weights == "ema" and plan_.kind == "param":
            t = self._read_ema(piece)
        elif plan_.kind == "param" and self._mp_index(piece.mp_file_rank) is not None:
            t = self._read_master(self._mp_index(piece.mp_file_rank), piece)
        else:
            t = self._read_module(piece)
        if list(t.shape) != list(piece.shape):
            raise UserError(f"{self.folder}: {piece.local} (tp={piece.tp}, pp={piece.pp}) has shape "
                            f"{list(t.shape)} in the files, the manifest says {piece.shape}")
        self.files.account(t.numel() * t.element_size())
        return t

    def _read_ema(self, piece: Piece) -> torch.Tensor:
        paths = [self.folder / EMA_DIR / f for f in ema_files.shard_files(self.manifest, piece.tp, piece.pp)]
        if self.manifest["ema"] != EMA_PER_RANK:  # the shard's tensors, in one of its files
            key = (piece.tp, piece.pp)
            if key not in self._ema_index:
                self._ema_index[key] = {n: p for p in paths for n in self.files.safetensors(p).keys()}
            path = self._ema_index[key].get(piece.local)
            if path is None:
                raise UserError(f"{self.folder}: no EMA weights for {piece.local} (tp={piece.tp}, pp={piece.pp}) in "
                                f"{', '.join(p.name for p in paths)}; {safe_load.RESTORE}")
            return self.files.safetensors(path).get_tensor(piece.local)
        # ZeRO-3: every data-parallel rank holds a contiguous piece of the flattened tensor
        parts = [self.files.safetensors(p).get_tensor(piece.local).reshape(-1) for p in paths]
        return torch.cat(parts)[:math.prod(piece.shape)].view(piece.shape)

    def _read_master(self, index: dict, piece: Piece) -> torch.Tensor:
        numel = math.prod(piece.shape)
        if index["kind"] == "slices":
            frags = index["frags"].get(piece.local)
            if frags is None:
                raise UserError(f"{self.folder}: no fp32 master weights for {piece.local} "
                                f"(model-parallel rank {piece.mp_file_rank})")
            parts = [self.files.get(path)[OSD]["single_partition_of_fp32_groups"][g].narrow(0, start, n).clone()
                     for path, g, start, n in frags]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            if flat.numel() != numel:
                raise UserError(f"{self.folder}: the fragments of {piece.local} hold {flat.numel()} elements, "
                                f"its shape {piece.shape} needs {numel}")
            return flat.view(piece.shape)
        off, part, _ = index["offsets"][piece.local]
        parts = [self._flat_range(path, index["group_sizes"], off, part) for path in index["paths"]]
        return torch.cat(parts)[:numel].view(piece.shape)

    def _flat_range(self, path: Path, group_sizes: list[int], start: int, n: int) -> torch.Tensor:
        """Elements [start, start+n) of the concatenation of one rank's ZeRO-3 flat groups."""
        groups = self.files.get(path)[OSD]["fp32_flat_groups"]
        out, base = [], 0
        for g, size in enumerate(group_sizes):
            lo, hi = max(start, base), min(start + n, base + size)
            if lo < hi:
                out.append(groups[g].narrow(0, lo - base, hi - lo).clone())
            base += size
        return out[0] if len(out) == 1 else torch.cat(out)

    def _model_file(self, mp: int) -> Path:
        zero3 = self.manifest["layout"]["zero_stage"] == 3
        return self.folder / (f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if zero3
                              else f"mp_rank_{mp:02d}_model_states.pt")

    def _read_module(self, piece: Piece) -> torch.Tensor:
        if piece.layer_file is not None:  # pipeline engine: one file per layer and TP rank
            return self.files.get(self.folder / piece.layer_file)[piece.layer_key].clone()
        path = self._model_file(piece.mp_file_rank)
        module = self.files.get(path)["module"]
        if module is None or piece.local not in module:
            raise UserError(f"{path}: no tensor {piece.local}")
        return module[piece.local].clone()

    # ---------------------------------------------------------------- optimizer state

    def _read_moment(self, piece: Piece, key: str) -> torch.Tensor:
        index = self._mp_index(piece.mp_file_rank)
        numel = math.prod(piece.shape)
        if index is None:  # ZeRO 0 in fp32: torch's own optimizer state_dict, in the model file
            if piece.optim_slot is None:
                raise UserError(f"{self.folder}: the manifest records no optimizer slot for {piece.local} (the "
                                "checkpoint predates resharding of optimizer state); resume it under the layout "
                                "that wrote it")
            state = self._torch_states(piece.mp_file_rank).get(piece.optim_slot)
            return state[key].clone().view(piece.shape) if state else torch.zeros(piece.shape)
        if index["kind"] != "slices":
            raise UserError(f"{self.folder}: reading the Adam moments of a ZeRO-3 checkpoint is not supported; "
                            "resume it under the layout that wrote it")
        parts = []
        for path, g, start, n in index["frags"][piece.local]:
            state = self.files.get(path)[OSD][BASE]["state"].get(g)  # one flat partition per group
            parts.append(state[key].narrow(0, start, n).clone() if state else torch.zeros(n))
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if flat.numel() != numel:
            raise UserError(f"{self.folder}: the optimizer state of {piece.local} holds {flat.numel()} elements, "
                            f"its shape {piece.shape} needs {numel}")
        return flat.view(piece.shape)

    def _torch_states(self, mp: int) -> dict:
        path = self._model_file(mp)
        osd = self.files.get(path).get("optimizer")
        if not isinstance(osd, dict) or "state" not in osd:
            raise UserError(f"{path}: no optimizer state (the checkpoint has none for this layout)")
        return osd["state"]

    def adam_step(self) -> Optional[float]:
        """AdamW's step count, the same for every parameter (steps whose update was dropped are not
        counted); None when the optimizer has not stepped yet."""
        seen = set()
        for mp in sorted({s["mp_file_rank"] for s in self.manifest["shards"]}):
            index = self._mp_index(mp)
            if index is None:
                states = list(self._torch_states(mp).values())
            elif index["kind"] == "slices":
                states = [st for path in self.optim_files[mp] for st in self.files.get(path)[OSD][BASE]["state"].values()]
            else:
                raise UserError(f"{self.folder}: reading the optimizer state of a ZeRO-3 checkpoint is not "
                                "supported; resume it under the layout that wrote it")
            seen |= {float(st["step"]) for st in states if "step" in st}
        if len(seen) > 1:
            raise UserError(f"{self.folder}: the optimizer's step counts differ between parameters ({sorted(seen)}): "
                            "the checkpoint is inconsistent")
        return seen.pop() if seen else None

    def engine_state(self) -> dict:
        """DeepSpeed's counters and the LR schedule, as the engine saved them (the same on every rank)."""
        sd = self.files.get(self._model_file(0))
        return {k: sd.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}

    # ---------------------------------------------------------------- full tensors

    def full(self, p: TensorPlan, state: Optional[str] = None) -> torch.Tensor:
        """The whole tensor (TP pieces joined, padding dropped); `state`: an Adam moment of it."""
        pieces = [self.read(p, piece, state) for piece in p.pieces]
        full = shards.join(pieces, p.partition_dim, p.stride)
        if p.unpadded_size is not None:  # drop the rows the TP degree added
            full = full.narrow(p.partition_dim, 0, p.unpadded_size)
        return full


def output_dtype(p: TensorPlan, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Floating tensors come out in fp32 (the master precision) unless a dtype is asked for."""
    if not p.dtype.is_floating_point:
        return p.dtype
    return dtype or torch.float32
