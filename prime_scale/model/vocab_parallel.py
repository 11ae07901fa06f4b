"""Carry-over and both Prime losses on vocabulary shards (tensor parallelism over the output head).

Each tensor-parallel rank holds logits for the classes [vocab_start, vocab_start + V_local) (the last
shard may hold padding classes >= V, which are never allowed). The full [B, L, V] logits are never
gathered: per token position only two collectives run,
  1. all-reduce MAX of the largest allowed logit                         [B, L]
  2. all-reduce SUM of the partition function, plus either the target    [B, L, 2]      (joint, ℓ = 1)
     logit or the ℓ digit-marginal masses                                [B, L, 1 + ℓ]  (ELBO, ℓ > 1)
and the backward pass needs no communication (its gradient is local: softmax minus target).

Cost on [B, L, V_local]: the carry-over restriction and the ℓ digit marginals are each one GEMM with
a fixed 0/1 digit table H [V_local, ℓ·b] (2·ℓ·b flops per logit), instead of ℓ masked passes:
  restricted logits  z = logits + P Hᵀ, P[i, j·b + k] = −1e30 where digit j of token i is visible
                     and k is not its value (exp of an excluded logit is exactly 0);
  digit marginals    (e H)[i, j·b + k] = mass of the classes whose digit j is k.
For ℓ = 1 neither is needed: a visible token contributes exactly 0 (carry-over leaves one class).

Definitions follow prime_scale.prime exactly (docs/method.md); tests compare against it on the
gathered tensors. All arithmetic is fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from prime_scale import prime

OBJECTIVES = ("prime_joint", "prime_elbo")
EXCLUDED = -1e30  # additive penalty of a class carry-over excludes
# exp() leaves its vectorised fast path (5–50× slower) whenever the result is not a normal float;
# shifted logits are clamped here first, so an excluded class gets e ≈ 1.6e-38 instead of 0:
# nothing next to Z ≥ 1 in fp32, and padding classes are zeroed exactly afterwards
EXP_FLOOR = -87.0


@functools.lru_cache(maxsize=8)
def _digit_onehot(vocab_size: int, ell: int, vocab_start: int, local_size: int, device: str) -> torch.Tensor:
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


def _restricted_logits(logits, yt, vocab_size: int, ell: int, vocab_start: int, carry_over: bool):
    """fp32 copy of the logits shard with carry-over's excluded classes at ≈ −1e30 (ℓ > 1) and the
    padding classes at −inf. For ℓ = 1 carry-over acts through the row weights instead."""
    B, L, local = logits.shape
    if carry_over and ell > 1:
        b = prime.base_for(vocab_size, ell)
        y = yt.reshape(B * L, ell)
        digits = torch.arange(b, device=yt.device)
        exclude = (y != b).unsqueeze(-1) & (digits != y.unsqueeze(-1))  # [B·L, ℓ, b]
        penalty = torch.where(exclude, EXCLUDED, 0.0).view(B * L, ell * b)
        onehot = _digit_onehot(vocab_size, ell, vocab_start, local, str(logits.device))
        z = torch.addmm(logits.reshape(B * L, local).float(), penalty, onehot.t()).view(B, L, local)
    else:
        z = logits.float().clone()
    valid = min(max(vocab_size - vocab_start, 0), local)
    if valid < local:
        z[..., valid:] = float("-inf")
    return z


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _shift_by_max(z, group, vocab_size):
    """z − max in place, with the max of the allowed logits all-reduced over the shards."""
    zmax = _all_reduce(z.amax(-1), dist.ReduceOp.MAX, group)
    if bool((zmax < EXCLUDED / 2).any()):
        raise ValueError("vocab-parallel Prime loss: a position's visible digits match no valid token "
                         f"(a code >= V={vocab_size}); yt is not a noised valid sequence")
    return z.sub_(zmax.unsqueeze(-1))


def _exp(z, vocab_size: int, vocab_start: int):
    """e = exp(z) in place on the shifted logits (the private fp32 copy becomes e)."""
    e = z.clamp_(min=EXP_FLOOR).exp_()
    valid = min(max(vocab_size - vocab_start, 0), e.shape[-1])
    if valid < e.shape[-1]:
        e[..., valid:] = 0.0
    return e


class _PrimeNLL(torch.autograd.Function):
    """Per-token Prime loss nll[B, L] (weighted by 1/t) from a logits shard. With e = exp(z − max)
    on allowed classes (0 elsewhere), Z = Σ e, S_j = mass of the classes whose digit j is the
    target's, m_j = digit j masked, n = Σ m_j, w = upstream gradient / t:
      joint  nll = (log Z − (z_x0 − max)) / t          ∂/∂z_c = w (e_c / Z − [c = x0])
      ELBO   nll = Σ_j m_j (log Z − log S_j) / t       ∂/∂z_c = w e_c (n / Z − Σ_j m_j [digit_j(c) = y0_j] / S_j)
    For ℓ = 1 both are the joint form on the rows that count (the ELBO's S_0 is the target's mass)."""

    @staticmethod
    def forward(ctx, logits, x0, yt, t, vocab_size, ell, vocab_start, objective, carry_over, group):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
        B, L, local = logits.shape
        b = prime.base_for(vocab_size, ell)
        masked = (yt == b).reshape(B, L, ell)
        t = t.float().unsqueeze(-1)
        z = _shift_by_max(_restricted_logits(logits, yt, vocab_size, ell, vocab_start, carry_over), group, vocab_size)
        use_digits = objective == "prime_elbo" and ell > 1
        if not use_digits:
            x0_local = x0.long() - vocab_start
            owned = (x0_local >= 0) & (x0_local < local)
            idx = x0_local.clamp(0, local - 1).unsqueeze(-1)
            # the target's shifted logit z_x0 − max, from the rank that owns it (x0 is always allowed)
            z_target = torch.where(owned, z.gather(-1, idx).squeeze(-1), torch.zeros_like(t))
            e = _exp(z, vocab_size, vocab_start)
            sums = _all_reduce(torch.stack([e.sum(-1), z_target], -1), dist.ReduceOp.SUM, group)
            nll = (sums[..., 0].log() - sums[..., 1]) / t
            # rows that count: for ℓ = 1 the masked tokens (ELBO; joint with carry-over, where a
            # visible token keeps one class and costs exactly 0); otherwise every token (for ℓ > 1
            # the restricted logits already make a fully visible token cost 0)
            if ell == 1 and (objective == "prime_elbo" or carry_over):
                counts = masked[..., 0]
            else:
                counts = torch.ones_like(masked[..., 0])
            nll = torch.where(counts, nll, torch.zeros_like(nll))
            ctx.save_for_backward(e, sums, idx, owned, counts, t)
        else:
            e = _exp(z, vocab_size, vocab_start)
            onehot = _digit_onehot(vocab_size, ell, vocab_start, local, str(logits.device))
            mass = (e.view(B * L, local) @ onehot).view(B, L, ell * b)  # every digit value's mass
            y0 = prime.subtokenize(x0, vocab_size, ell).reshape(B, L, ell)
            cols = y0 + torch.arange(ell, device=y0.device) * b
            parts = torch.cat([mass[..., :b].sum(-1, keepdim=True), mass.gather(-1, cols)], -1)  # Z, S_j
            sums = _all_reduce(parts, dist.ReduceOp.SUM, group)
            log_z = sums[..., :1].log()
            # S_j ≥ the target's own mass > 0, up to fp32 underflow
            log_s = sums[..., 1:].clamp_min(torch.finfo(torch.float32).tiny).log()
            nll = torch.where(masked, log_z - log_s, torch.zeros_like(log_s)).sum(-1) / t
            ctx.save_for_backward(e, sums, cols, masked, t)
        ctx.use_digits = use_digits
        ctx.key = (vocab_size, ell, vocab_start, local, str(logits.device))
        ctx.logits_dtype = logits.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if not ctx.use_digits:
            e, sums, idx, owned, counts, t = ctx.saved_tensors
            w = torch.where(counts, grad_nll.float() / t, torch.zeros_like(t))
            grad = e.mul_((w / sums[..., 0]).unsqueeze(-1))
            grad.scatter_add_(-1, idx, torch.where(owned, -w, torch.zeros_like(w)).unsqueeze(-1))
        else:
            e, sums, cols, masked, t = ctx.saved_tensors
            B, L, local = e.shape
            onehot = _digit_onehot(*ctx.key)
            w = grad_nll.float() / t  # [B, L]
            per_token = w * masked.sum(-1) / sums[..., 0]  # w n / Z
            coef = torch.zeros(B, L, onehot.shape[1], device=e.device)
            coef.scatter_(-1, cols, torch.where(masked, w.unsqueeze(-1) / sums[..., 1:], torch.zeros_like(sums[..., 1:])))
            # w (n/Z − Σ_j m_j [digit_j(c) = y0_j] / S_j) for every class, as one GEMM
            factor = torch.addmm(per_token.view(B * L, 1), coef.view(B * L, -1), onehot.t(), alpha=-1.0)
            grad = e.mul_(factor.view(B, L, local))
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None, None, None, None


def prime_loss_parallel(logits_shard, x0, yt, t, attention_mask, vocab_size: int, ell: int, *,
                        vocab_start: int, group=None, objective: str = "prime_elbo", carry_over: bool = True):
    """(nll [B, L], mean) of the chosen objective from this rank's logits shard. Every rank of the
    tensor-parallel `group` gets the same values; gradients flow to the local shard only."""
    nll = _PrimeNLL.apply(logits_shard, x0, yt, t, vocab_size, ell, vocab_start, objective, carry_over, group)
    return prime.attended_mean(nll, attention_mask)
