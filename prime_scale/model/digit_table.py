"""The fixed 0/1 digit table of a vocabulary shard and the three products the Prime loss needs from
it (prime_scale/model/vocab_parallel.py): H [V_local, ℓ·b], H[c, j·b + k] = 1 when digit j of class c
is k (classes numbered most significant digit first; padding classes have no digit)."""

from __future__ import annotations

import functools

import torch

from prime_scale import prime

# the digit grid of Digits pays off from this base up (2 CPU threads, [2048, V] fp32: 3.0–3.7× the
# GEMM at V = 16384, ℓ = 2 (b = 128), 1.2× at V = 4096, ℓ = 2 (b = 64), 0.9× at V = 16384, ℓ = 4 (b = 12))
GRID_MIN_BASE = 32


@functools.lru_cache(maxsize=8)
def digit_onehot(vocab_size: int, ell: int, vocab_start: int, local_size: int, device: str) -> torch.Tensor:
    """H [V_local, ℓ·b] fp32: H[c, j·b + k] = 1 when digit j of class c is k (padding rows are 0)."""
    b = prime.base_for(vocab_size, ell)
    stop = min(vocab_start + local_size, vocab_size)
    onehot = torch.zeros(local_size, ell * b)
    if stop > vocab_start:
        dig = prime.digit_table(vocab_size, ell)[vocab_start:stop]
        rows = torch.arange(stop - vocab_start)
        for j in range(ell):
            onehot[rows, j * b + dig[:, j]] = 1.0
    return onehot.to(device)


class Digits:
    """The digit table H [V_local, ℓ·b] of a shard as the three products the loss needs, computed
    from the digits' structure where it can be: classes are numbered most significant digit first,
    so a run of whole blocks of the leading digit (P = b^(ℓ−1) classes each, every combination of
    the other digits once) is a [q, b, …, b] grid with digit j on axis j. On that grid
      penalty @ Hᵀ  is a broadcast add of ℓ vectors of b values,
      e @ H         is ℓ sums over the other axes,
      coef @ Hᵀ     is a broadcast of ℓ vectors again,
    ℓ·V work per position instead of the GEMM's 2·ℓ·b·V (a GEMM's worth at V = 16384, ℓ = 2). The
    few classes outside whole blocks (a shard's ragged ends, the partial last block) keep the GEMM
    with their rows of H; padding classes take no part. Exactly the GEMM's sums, in another order.
    Below GRID_MIN_BASE the GEMM is as fast (its 2·ℓ·b flops per logit are few) and is used throughout."""

    def __init__(self, vocab_size: int, ell: int, vocab_start: int, local_size: int, device: str,
                 min_base: int = 32):
        self.ell, self.b = ell, prime.base_for(vocab_size, ell)
        block = self.b ** (ell - 1)
        valid = min(max(vocab_size - vocab_start, 0), local_size)  # classes of this shard below V
        first = min(-(-vocab_start // block) * block - vocab_start, valid)  # the first whole block
        self.q = (valid - first) // block
        self.lo, self.hi = first, first + self.q * block  # shard columns of the grid
        self.lead = (vocab_start + first) // block  # the grid's first leading digit
        onehot = digit_onehot(vocab_size, ell, vocab_start, local_size, device)
        self.ragged = [(a, z, onehot[a:z]) for a, z in ((0, self.lo), (self.hi, valid)) if z > a]
        if self.b < min_base:
            self.q, self.lo, self.hi = 0, 0, 0
        if self.q == 0:  # no whole block (tiny shards) or a small base: the GEMM for every class
            self.ragged = [(0, valid, onehot[:valid])] if valid else []
        self.valid = valid

    def _grid(self, x2d: torch.Tensor) -> torch.Tensor:
        return x2d[:, self.lo:self.hi].view(x2d.shape[0], self.q, *(self.b,) * (self.ell - 1))

    def _along(self, vec: torch.Tensor, j: int) -> torch.Tensor:
        """[N, b] values of digit j, shaped to broadcast over the grid."""
        if j == 0:
            vec = vec[:, self.lead:self.lead + self.q]
        shape = [vec.shape[0]] + [1] * self.ell
        shape[1 + j] = vec.shape[1]
        return vec.reshape(shape)

    def add_product(self, x2d: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
        """x2d [N, V_local] += alpha · values [N, ℓ·b] @ Hᵀ, in place (the carry-over penalty, the
        backward factor)."""
        per_digit = values.view(-1, self.ell, self.b)
        if self.q:
            grid = self._grid(x2d)
            for j in range(self.ell):
                grid.add_(self._along(per_digit[:, j], j), alpha=alpha)
        for a, z, rows in self.ragged:
            x2d[:, a:z].addmm_(values, rows.t(), alpha=alpha)

    def mass(self, e2d: torch.Tensor) -> torch.Tensor:
        """e2d [N, V_local] @ H -> [N, ℓ·b]: every digit value's mass."""
        n = e2d.shape[0]
        out = torch.zeros(n, self.ell, self.b, dtype=e2d.dtype, device=e2d.device)
        if self.q:
            grid = self._grid(e2d)
            axes = list(range(1, self.ell + 1))
            for j in range(self.ell):
                summed = grid.sum(dim=[a for a in axes if a != j + 1]) if self.ell > 1 else grid
                if j == 0:
                    out[:, 0, self.lead:self.lead + self.q] += summed
                else:
                    out[:, j] += summed
        flat = out.view(n, self.ell * self.b)
        for a, z, rows in self.ragged:
            flat.addmm_(e2d[:, a:z], rows)
        return flat

    def factor(self, base: torch.Tensor, coef: torch.Tensor, width: int) -> torch.Tensor:
        """[N, width]: base [N, 1] − coef [N, ℓ·b] @ Hᵀ (padding classes: base)."""
        out = base.expand(base.shape[0], width).clone()
        self.add_product(out, coef, alpha=-1.0)
        return out


def digits(vocab_size: int, ell: int, vocab_start: int, local_size: int, device: str) -> Digits:
    return _cached(vocab_size, ell, vocab_start, local_size, device, GRID_MIN_BASE)


@functools.lru_cache(maxsize=8)
def _cached(vocab_size, ell, vocab_start, local_size, device, min_base) -> Digits:
    return Digits(vocab_size, ell, vocab_start, local_size, device, min_base)


@functools.lru_cache(maxsize=8)
def local_digits(vocab_size: int, ell: int, vocab_start: int, local_size: int, device: str) -> torch.Tensor:
    """[V_local, ℓ] long: the digits of this shard's classes; −1 on padding classes, so they match
    neither a digit nor the mask symbol."""
    dig = torch.full((local_size, ell), -1, dtype=torch.long)
    stop = min(vocab_start + local_size, vocab_size)
    if stop > vocab_start:
        dig[:stop - vocab_start] = prime.digit_table(vocab_size, ell)[vocab_start:stop]
    return dig.to(device)
