"""Layout-independent Prime noise, and the micro-batches that carry it.

Every sample's noise comes from a generator keyed by (run seed, step or evaluation draw, GLOBAL sample
index): the same sample gets the same noise under every (TP, PP, DP) layout and batch split, and a
resumed run repeats exactly. The noise is applied where a batch is built (`make_batch`,
`make_eval_batch`), so every pipeline stage and TP peer holds the same y_t, t and x0.

Two noise distributions, one per purpose (docs/method.md):
- training (`prime_noise`): the reference's convention. t ~ U[ε, 1], antithetic over the global batch
  (stratum = the sample's POSITION in the global batch of its step), every sub-token masked
  independently with probability (1 − ε)·t, loss weight 1/t. Unbiased for the training objective,
  but not an exact NELBO: it leaves out t < ε and the prior term at t = 1.
- evaluation (`eval_noise`): the exact NELBO of the linear schedule α_t = 1 − t (α_0 = 1, α_1 = 0:
  no prior term, no truncation), with t integrated out analytically. Given that k of the N sub-tokens
  are masked, E[1/t | k] = (N + 1)/k and P(k) = 1/(N + 1), so
      NELBO(x) = Σ_{k=1..N} (1/k) E_{M uniform, |M| = k}[Σ_{j ∈ M} −log p(y0_j | y_M)],
  estimated by drawing k uniformly from 1..N (antithetic over a sequence's K draws) and M uniformly
  of size k, with weight N/k: the batch carries t = k/N, so every loss path's 1/t weight applies as
  is. Every weight is at most N: the estimate has finite variance, unlike 1/t with t down to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Optional

import torch

from prime_scale.prime import EPS, apply_mask

EVAL_NOISE_STEP = 1 << 48  # noise key of evaluation draws (plus the draw number): never a training step


def stratified_time(u, stratum, n: int, eps: float = EPS):
    """Antithetic (stratified) time: u in [0, 1) moved into stratum `stratum` of n,
    t = (1 - eps) · ((u + stratum) / n mod 1) + eps. Exactly uniform on [eps, 1] for any stratum."""
    return (1 - eps) * (((u + stratum) / n) % 1.0) + eps


def generator_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed from (seed, step, global sample index) (splitmix64 finaliser)."""
    mask64 = (1 << 64) - 1
    z = 0
    for part in (seed, step, index):
        z = (z ^ (part & mask64)) * 0x9E3779B97F4A7C15 & mask64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def _check_ids(x0: torch.Tensor, index: torch.Tensor, vocab_size: int) -> None:
    bad = (x0 < 0) | (x0 >= vocab_size)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"sample {int(index[row])}, position {col}: token id {int(x0[row, col])} is outside "
                         f"the vocabulary [0, {vocab_size}); the data does not match the model's tokenizer")


# --------------------------------------------------------------------------- training noise


def prime_noise(seed: int, step: int, sample_index: torch.Tensor, position: torch.Tensor, global_batch: int,
                seq_len: int, ell: int, eps: float = EPS):
    """Training noise: t [B] (fp32) and the sub-token mask [B, L*ell] (bool) per sample, keyed by
    (seed, step, global sample index). The antithetic stratum of t is `position` mod global_batch:
    the sample's position in its step's global batch (the loader's stream advances by one global
    batch per step), so one step's G samples fill the G strata exactly, however the data is shuffled."""
    n = int(global_batch)
    ts, masks = [], []
    for idx, pos in zip(sample_index.tolist(), position.tolist()):
        g = torch.Generator().manual_seed(generator_seed(seed, step, int(idx)))
        u = torch.rand((), generator=g, dtype=torch.float64)
        t = stratified_time(u, int(pos) % n, n, eps)
        ts.append(t)
        masks.append(torch.rand(seq_len * ell, generator=g, dtype=torch.float64) < (1 - eps) * t)
    t = torch.stack(ts).float() if ts else torch.zeros(0)
    mask = torch.stack(masks) if masks else torch.zeros(0, seq_len * ell, dtype=torch.bool)
    return t.to(sample_index.device), mask.to(sample_index.device)


# --------------------------------------------------------------------------- evaluation noise


def eval_noise(seed: int, sample_index: torch.Tensor, draw: int, draws: int, counted: torch.Tensor, ell: int):
    """Evaluation noise for draw `draw` of `draws` per sequence: t = k/N [B] (fp32) and a mask
    [B, L*ell] with exactly k of the row's N counted sub-tokens masked (`counted` [B, L]: the
    positions that count; N = ell × their number). k is uniform on 1..N, stratified over the draws
    of a sequence; the masked set is uniform among those of size k. Rows with nothing counted get
    t = 1 and no mask. Keyed by (seed, EVAL_NOISE_STEP + draw, global sample index)."""
    B, L = counted.shape
    eligible = counted.bool().repeat_interleave(ell, dim=-1)
    ts, masks = [], []
    for row, idx in enumerate(sample_index.tolist()):
        g = torch.Generator().manual_seed(generator_seed(seed, EVAL_NOISE_STEP + int(draw), int(idx)))
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        n = int(eligible[row].sum())
        k = min(int(((u + draw) / draws % 1.0) * n) + 1, n)
        scores = torch.rand(L * ell, generator=g, dtype=torch.float64).masked_fill(~eligible[row], 2.0)
        mask = torch.zeros(L * ell, dtype=torch.bool)
        mask[scores.argsort()[:k]] = True  # the k smallest of iid uniforms: a uniform k-subset
        ts.append(k / n if n else 1.0)
        masks.append(mask)
    t = torch.tensor(ts, dtype=torch.float32)
    mask = torch.stack(masks) if masks else torch.zeros(0, L * ell, dtype=torch.bool)
    return t.to(sample_index.device), mask.to(sample_index.device)


def eval_mask_probability(masked: int, total: int) -> float:
    """The probability `eval_noise` gives one particular mask with `masked` of `total` counted
    sub-tokens masked (in any one draw): P(k) · P(M | k) = 1/total · 1/C(total, masked)."""
    if not 1 <= masked <= total:
        return 0.0
    return 1.0 / (total * comb(total, masked))


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One micro-batch: clean tokens, the noisy sub-tokens and the per-sample diffusion time."""

    x0: torch.Tensor  # [B, L] long
    yt: torch.Tensor  # [B, L·ℓ] long
    t: torch.Tensor  # [B] fp32: the loss weight is 1/t
    mask: torch.Tensor  # [B, L] bool: positions that count (padding rows of a held-out split do not)

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> "Batch":
        """The batch on `device`. To a GPU: from page-locked memory without blocking the host (a
        pageable, blocking copy waits for every kernel queued before it, i.e. the previous
        micro-batch's backward). The copies are ordered on the current stream before any kernel
        that reads them, and the caching host allocator keeps each pinned source until its copy is
        done. make_batch checked the ids on the CPU, so nothing downstream reads them back."""
        device = torch.device(device)
        if device.type != "cuda":
            return Batch(self.x0.to(device), self.yt.to(device), self.t.to(device), self.mask.to(device))

        def copy(x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu" and not x.is_pinned():
                x = x.pin_memory()
            return x.to(device, non_blocking=True)

        return Batch(copy(self.x0), copy(self.yt), copy(self.t), copy(self.mask))

    def labels(self):
        """What the loss needs: (x0, yt, t, mask); the last pipeline stage reads it directly."""
        return self.x0, self.yt, self.t, self.mask


def _counted(x0: torch.Tensor, valid: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    rows = torch.ones(x0.shape[0], dtype=torch.bool) if valid is None else valid.bool().to(x0.device)
    counted = rows.unsqueeze(1).expand_as(x0)
    if attention_mask is not None:
        counted = counted & attention_mask.bool().to(x0.device)
    return counted.contiguous()


def make_batch(input_ids: torch.Tensor, index: torch.Tensor, position: torch.Tensor, *, seed: int, step: int,
               global_batch: int, vocab_size: int, ell: int, valid: Optional[torch.Tensor] = None) -> Batch:
    """A training micro-batch, noised by (seed, step, global sample index) with its time stratum
    from the stream `position`: independent of the layout that reads it. `valid` [B] marks real
    rows (a loader pads the end of a held-out split)."""
    x0 = input_ids.long()
    _check_ids(x0, index, vocab_size)
    t, mask = prime_noise(seed, step, index.long(), position.long(), global_batch, x0.shape[1], ell)
    return Batch(x0=x0, yt=apply_mask(x0, mask, vocab_size, ell), t=t, mask=_counted(x0, valid, None))


def make_eval_batch(input_ids: torch.Tensor, index: torch.Tensor, *, seed: int, draw: int, draws: int,
                    vocab_size: int, ell: int, valid: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> Batch:
    """An evaluation micro-batch for draw `draw` of `draws` (eval_noise). Rows with valid=False and
    positions with attention_mask 0 neither count nor get masked; their ids are only checked where
    they count (padding may hold any id: it is replaced by 0, a valid token, before the model sees it)."""
    x0 = input_ids.long()
    counted = _counted(x0, valid, attention_mask)
    _check_ids(torch.where(counted, x0, torch.zeros_like(x0)), index, vocab_size)
    x0 = torch.where(counted | ((x0 >= 0) & (x0 < vocab_size)), x0, torch.zeros_like(x0))
    _, mask = eval_noise(seed, index.long(), draw, draws, counted, ell)
    return masked_eval_batch(x0, mask, counted, vocab_size, ell)


def masked_eval_batch(x0: torch.Tensor, mask: torch.Tensor, counted: torch.Tensor, vocab_size: int,
                      ell: int) -> Batch:
    """The evaluation batch of a given sub-token mask [B, L·ℓ]: t = k/N per row (k masked of the N
    counted sub-tokens), so the losses' 1/t is the estimator's weight N/k. `make_eval_batch` builds
    every batch through here; the enumeration proof feeds it every mask with its probability."""
    n = counted.sum(-1) * ell
    k = mask.sum(-1)
    t = torch.where(n > 0, k.double() / n.clamp(min=1).double(), torch.ones_like(n, dtype=torch.float64))
    return Batch(x0=x0, yt=apply_mask(x0, mask, vocab_size, ell), t=t.float(), mask=counted)
