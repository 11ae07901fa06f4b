"""Layout-independent names and sizes of the model's tensors.

A parameter's canonical name is "<layer index>.<path in the layer>": the same in a whole model and
in a pipeline stage, under any TP degree. Checkpoints record these names, so an export and a
resharded load match tensors without model code. Tensors that the model pads to a multiple of the
TP degree (vocabulary rows) also record their true size.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch

from torch import nn

from prime_scale.model.transformer import PrimeEmbedding, PrimeHead, PrimeLayer

# local (DeepSpeed / module) name -> canonical name: a mapping, a function, or None (names as they are)
NameMap = Union[None, Mapping[str, str], Callable[[str], str]]


def canonical_named_parameters(module: nn.Module):
    """(canonical name, parameter) for whatever part of the layer sequence this process holds."""
    for layer in module.modules():
        if isinstance(layer, PrimeLayer):
            for name, param in layer.named_parameters():
                yield f"{layer.layer_index}.{name}", param


def name_map(module: nn.Module) -> dict[str, str]:
    """The module's local parameter names -> the model's canonical names."""
    canonical = {id(p): name for name, p in canonical_named_parameters(module)}
    return {local: canonical[id(p)] for local, p in module.named_parameters() if id(p) in canonical}


def canonical_name(names: NameMap, local: str) -> str:
    if names is None:
        return local
    if callable(names):
        return names(local)
    return names.get(local, local)


def persistent_buffers(module: nn.Module, prefix: str = ""):
    """(local name, buffer) of the buffers a state_dict holds."""
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, buf
    for name, child in module.named_children():
        yield from persistent_buffers(child, prefix + name + ".")


def partition_info(param: torch.Tensor) -> tuple[Optional[int], int]:
    """(partition_dim or None when replicated, stride) of a live parameter: megatron marks every
    TP-split parameter with tensor_model_parallel, partition_dim and partition_stride."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None, 1


def unpadded_sizes(module: nn.Module, vocab_size: int) -> dict[str, int]:
    """Tensors the model pads to a multiple of the TP degree, with their true row counts: the
    output head's vocabulary rows, and the sub-token table when it is vocab-parallel (ℓ = 1)."""
    sizes = {}
    for layer in module.modules():
        if isinstance(layer, PrimeHead):
            sizes[f"{layer.layer_index}.out.weight"] = vocab_size
        elif isinstance(layer, PrimeEmbedding) and layer.args.ell == 1:
            sizes[f"{layer.layer_index}.embed.weight"] = layer.args.base + 1
    return sizes
