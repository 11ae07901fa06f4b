"""Load a consolidated checkpoint into a model of any (TP, PP) layout.

Every parameter of the (possibly TP-split, possibly one pipeline stage of a) model takes its slice
of the full tensor along the partition dim megatron recorded on the parameter itself. Only the
needed slice is read from the safetensors file. Call it on the bare model, before
deepspeed.initialize: DeepSpeed's optimizers keep their own fp32 copies of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from prime_scale.errors import UserError
from prime_scale.export import shards, untrusted
from prime_scale.model.naming import NameMap, canonical_name, partition_info, persistent_buffers
from prime_scale.model.transformer import PrimeLayer, layer_builders


def weights_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    f = path / "model.safetensors" if path.is_dir() else path
    if not f.is_file():
        raise UserError(f"{path}: no model.safetensors (make one with prime-scale convert)")
    return f


def read_config(path: Union[str, Path]) -> dict:
    """config.json of a consolidated checkpoint directory, checked (export/untrusted.py)."""
    f = Path(path) / "config.json"
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no config.json; is this a directory written by prime-scale convert?") from None
    except OSError as e:
        raise UserError(f"{f}: cannot read: {e.strerror or e}") from None
    return untrusted.parse_config(raw, f)


@torch.no_grad()
def load_consolidated_into(model: torch.nn.Module, path: Union[str, Path], *, name_map: NameMap = None,
                           tp_rank: int = 0, tp_size: int = 1, where: Optional[str] = None) -> list[str]:
    """Copy a consolidated checkpoint (a directory from prime-scale convert, or its model.safetensors)
    into `model`'s own parameters and persistent buffers. name_map: the model's local names ->
    canonical names (as given to checkpoint.save); tp_rank / tp_size: this rank's place in the
    tensor-parallel group the model was built for; where: how errors name the file (default its path).
    The file must hold the model's tensors and no others (export/untrusted.py checks its header
    first), each of a compatible shape, floating point and finite. Returns the canonical names loaded."""
    from safetensors import SafetensorError, safe_open

    f_path = weights_file(path)
    where = where or str(f_path)
    header = untrusted.read_header(f_path, where)
    targets = [(n, p, partition_info(p)) for n, p in model.named_parameters()]
    targets += [(n, b, (None, 1)) for n, b in persistent_buffers(model)]
    _check_names(where, header, {canonical_name(name_map, local): local for local, _, _ in targets}, model)
    loaded = []
    try:
        with safe_open(str(f_path), framework="pt", device="cpu") as f:
            for local, tensor, (dim, stride) in targets:
                if hasattr(tensor, "ds_id"):
                    raise UserError("load_consolidated_into: the model is already partitioned by ZeRO-3; "
                                    "load the weights before deepspeed.initialize")
                name = canonical_name(name_map, local)
                entry = header[name]
                if entry.dtype.is_floating_point != tensor.is_floating_point():
                    raise UserError(f"{where}: tensor {name} is {entry.dtype} in the file, but the model's {local} "
                                    f"is {tensor.dtype}; {untrusted.REEXPORT}")
                full_shape = list(entry.shape)
                # rows this TP degree pads on (e.g. vocabulary rounded up to a multiple of TP) come out zero
                local_size = tensor.shape[dim] if dim is not None else None
                source = f.get_tensor(name) if dim is None else f.get_slice(name)  # a slice reads only the piece
                try:
                    piece = shards.take(source, full_shape, dim, tp_rank, tp_size, stride, local_size)
                except ValueError as e:
                    raise UserError(f"{where}: {name} of full shape {full_shape} does not fit the model's "
                                    f"{local} {list(tensor.shape)} on TP rank {tp_rank} of {tp_size}: {e}") from None
                if piece.shape != tensor.shape:
                    raise UserError(f"{where}: {name} has full shape {full_shape}; TP rank {tp_rank} of {tp_size} "
                                    f"gets {list(piece.shape)}, but the model's {local} is {list(tensor.shape)}")
                untrusted.check_finite(where, name, piece)
                tensor.copy_(piece.to(tensor.dtype))
                loaded.append(name)
    except SafetensorError as e:  # after read_header's checks only a file changed under us gets here
        raise UserError(f"{where}: unreadable safetensors file ({e}); {untrusted.REEXPORT}") from None
    return loaded


def _check_names(where: str, header: dict, wanted: dict[str, str], model: torch.nn.Module) -> None:
    """Every tensor the model needs is in the file, and the file holds no tensor of another model.
    A pipeline stage holds some layers only: a tensor of another stage's layer is that stage's concern
    (every layer is some stage's, so together they check the whole file)."""
    missing = [name for name in wanted if name not in header]
    if missing:
        raise UserError(f"{where}: no tensor {missing[0]} (the model's {wanted[missing[0]]})"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: the file is incomplete "
                        "or of another model (or name_map differs from the one used at save time); "
                        f"{untrusted.REEXPORT}")
    held = {name.partition(".")[0] for name in wanted}  # "<layer index>" of every layer this model holds
    layers = [m for m in model.modules() if isinstance(m, PrimeLayer)]
    count = len(layer_builders(layers[0].args)) if layers else None  # a Prime model's layers, all stages

    def foreign(name: str) -> bool:
        index = name.partition(".")[0]
        if index in held or not index.isdigit():
            return True
        return count is not None and int(index) >= count  # a layer no stage of this model has

    extra = sorted(name for name in header if name not in wanted and foreign(name))
    if extra:
        raise UserError(f"{where}: unknown tensor {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}"
                        f" (not a tensor of this model): the file is of another model or was altered; "
                        f"{untrusted.REEXPORT}")


# model arguments that fix the shapes of the weights
SHAPE_KEYS = ("layers", "hidden", "heads", "mlp_ratio", "ell", "vocab_size")


def check_init_from(cfg, path: Union[str, Path]) -> None:
    """Before a run starts from consolidated weights: they must be of the recipe's model shape."""
    path = Path(path)
    untrusted.read_header(weights_file(path))  # a broken file fails here, before any process starts
    saved = read_config(path)["model"]
    current = cfg.to_dict()["model"]
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, recipe {current.get(k)!r}" for k in SHAPE_KEYS
            if not (k == "vocab_size" and current.get(k) is None) and saved.get(k) != current.get(k)]
    if diff:
        raise UserError(f"{path}: the weights are of another model shape ({'; '.join(diff)}); set the recipe's "
                        "model section to the checkpoint's (config.json)")
