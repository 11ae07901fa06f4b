"""Layout-independent Prime noise, and the micro-batches that carry it.

Every sample's diffusion time t and sub-token mask come from a generator keyed by (run seed, step or
evaluation pass, GLOBAL sample index): the same sample gets the same noise under every (TP, PP, DP)
layout and batch split, and a resumed run repeats exactly. The noise is applied where a batch is
built (`make_batch`), so every pipeline stage and TP peer holds the same y_t, t and x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from prime_scale.prime import EPS, apply_mask

EVAL_NOISE_STEP = 1 << 48  # noise key of validation draws: never a training step


def stratified_time(u, stratum, n: int, eps: float = EPS):
    """Antithetic (stratified) time: u in [0, 1) moved into stratum `stratum` of n,
    t = (1 - eps) · ((u + stratum) / n mod 1) + eps. Exactly uniform on [eps, 1] for any stratum."""
    return (1 - eps) * (((u + stratum) / n) % 1.0) + eps


def _key(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed from (seed, step, global sample index) (splitmix64 finaliser)."""
    mask64 = (1 << 64) - 1
    z = 0
    for part in (seed, step, index):
        z = (z ^ (part & mask64)) * 0x9E3779B97F4A7C15 & mask64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def prime_noise(seed: int, step: int, sample_index: torch.Tensor, global_batch: int, seq_len: int,
                ell: int, eps: float = EPS):
    """t [B] (fp32) and the sub-token mask [B, L*ell] (bool) for each sample, keyed by
    (seed, step, global sample index).

    Antithetic time across the global batch: the sample's stratum is its index mod global_batch
    (its position inside the global batch for consecutively indexed data; t stays exactly uniform
    for any index)."""
    n = int(global_batch)
    ts, masks = [], []
    for idx in sample_index.tolist():
        g = torch.Generator().manual_seed(_key(seed, step, int(idx)))
        u = torch.rand((), generator=g, dtype=torch.float64)
        t = stratified_time(u, int(idx) % n, n, eps)
        ts.append(t)
        masks.append(torch.rand(seq_len * ell, generator=g, dtype=torch.float64) < (1 - eps) * t)
    t = torch.stack(ts).float() if ts else torch.zeros(0)
    mask = torch.stack(masks) if masks else torch.zeros(0, seq_len * ell, dtype=torch.bool)
    return t.to(sample_index.device), mask.to(sample_index.device)


@dataclass
class Batch:
    """One micro-batch: clean tokens, the noisy sub-tokens and the per-sample diffusion time."""

    x0: torch.Tensor  # [B, L] long
    yt: torch.Tensor  # [B, L·ℓ] long
    t: torch.Tensor  # [B] fp32
    mask: torch.Tensor  # [B, L] bool: positions that count (padding rows of a held-out split do not)

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.x0.to(device), self.yt.to(device), self.t.to(device), self.mask.to(device))

    def labels(self):
        """What the loss needs: (x0, yt, t, mask); the last pipeline stage reads it directly."""
        return self.x0, self.yt, self.t, self.mask


def make_batch(input_ids: torch.Tensor, index: torch.Tensor, *, seed: int, step: int, global_batch: int,
               vocab_size: int, ell: int, valid: Optional[torch.Tensor] = None) -> Batch:
    """Noise a micro-batch of token ids by (seed, step, global sample index): independent of the
    layout that reads it. `valid` [B] marks real rows (a loader pads the end of a held-out split)."""
    x0 = input_ids.long()
    t, mask = prime_noise(seed, step, index.long(), global_batch, x0.shape[1], ell)
    rows = torch.ones(x0.shape[0], dtype=torch.bool) if valid is None else valid.bool()
    return Batch(x0=x0, yt=apply_mask(x0, mask, vocab_size, ell), t=t,
                 mask=rows.unsqueeze(1).expand_as(x0).contiguous())
