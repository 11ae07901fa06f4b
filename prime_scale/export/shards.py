"""Tensor-parallel partitioning of one parameter, in megatron-core's convention.

megatron marks every split parameter with `tensor_model_parallel=True`, `partition_dim` and
`partition_stride`. With stride s and TP size n, the full tensor is cut along partition_dim into
s·n equal chunks and rank r holds chunks r, r+n, r+2n, … concatenated (s = 1: plain contiguous
split). These two functions are exact inverses of each other.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def join(pieces: Sequence[torch.Tensor], dim: Optional[int], stride: int = 1) -> torch.Tensor:
    """The full tensor from the TP ranks' pieces (in rank order)."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    n = len(pieces)
    if stride == 1:
        return torch.cat(list(pieces), dim=dim)
    chunks = [torch.chunk(p, stride, dim=dim) for p in pieces]
    return torch.cat([chunks[i % n][i // n] for i in range(stride * n)], dim=dim)


def ranges(full_size: int, rank: int, world: int, stride: int = 1) -> list[tuple[int, int]]:
    """The [start, stop) index ranges along the partition dim that TP rank `rank` holds."""
    if full_size % (world * stride):
        raise ValueError(f"size {full_size} along the partition dim is not divisible by "
                         f"TP size {world} × stride {stride}")
    chunk = full_size // (world * stride)
    return [((j * world + rank) * chunk, (j * world + rank + 1) * chunk) for j in range(stride)]


def split(full: torch.Tensor, dim: Optional[int], rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """TP rank `rank`'s piece of a full tensor."""
    if dim is None or world == 1:
        return full
    parts = [full.narrow(dim, a, b - a) for a, b in ranges(full.shape[dim], rank, world, stride)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def take(source, full_shape: Sequence[int], dim: Optional[int], rank: int, world: int, stride: int = 1,
         local_size: Optional[int] = None) -> torch.Tensor:
    """TP rank `rank`'s piece of a tensor of `full_shape`, read from `source` by slicing only: a tensor,
    or a safetensors slice (then only the piece's bytes are read). local_size: the rank's size along
    `dim` when the model pads the tensor to a multiple of the TP degree (vocabulary rows); the rows past
    the tensor's end come out as zeros. dim None: the tensor is replicated, every rank takes all of it."""
    everything = tuple(slice(None) for _ in full_shape)
    if dim is None:
        return source[everything]
    size = full_shape[dim]
    padded = size if local_size is None else local_size * world
    if padded == size:
        spans = ranges(size, rank, world, stride)
    elif padded < size or stride != 1:
        raise ValueError(f"a piece of {local_size} along dim {dim} on each of {world} TP ranks cannot hold "
                         f"size {size}" + (" (padding a strided partition is not supported)" if stride != 1 else ""))
    else:
        spans = [(min(rank * local_size, size), min((rank + 1) * local_size, size))]
    parts = [source[everything[:dim] + (slice(a, b),) + everything[dim + 1:]] for a, b in spans]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    if padded != size:
        missing = list(out.shape)
        missing[dim] = local_size - out.shape[dim]
        out = torch.cat([out, torch.zeros(missing, dtype=out.dtype)], dim=dim)
    return out
