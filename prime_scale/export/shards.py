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
