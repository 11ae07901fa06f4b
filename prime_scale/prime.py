"""The Prime objective (partial masking through sub-tokens), as docs/method.md describes it.

Pure torch: no distributed imports, any device, any batch shape. Notation:
  V      vocabulary size;  ell  token granularity (sub-tokens per token);  b = base_for(V, ell)
  x0     [B, L] token ids;  y0 = subtokenize(x0) [B, L*ell] digits, most significant first
  yt     [B, L*ell] noisy sub-tokens, the mask symbol is the integer b
  t      [B] diffusion time in (0, 1]; the loss weight -α'_t / (1 - α_t) is exactly 1/t

Two losses (§4):
  joint_loss     the paper's training objective (a). NOT an NLL bound when ell > 1.
  subtoken_elbo  the sub-token ELBO (b), using each masked digit's marginal under the joint: a valid
                 upper bound on the NLL. Every perplexity prime-scale reports comes from this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3  # α_t = 1 - (1 - EPS) t, and t is drawn from [EPS, 1]


# --------------------------------------------------------------------------- sub-tokens


def base_for(vocab_size: int, ell: int) -> int:
    """The smallest integer b >= 2 with b**ell >= vocab_size (integer arithmetic: the float formula
    ceil(V ** (1/ell)) is one too large when V is an exact ell-th power)."""
    if vocab_size < 1 or ell < 1:
        raise ValueError(f"need vocab_size >= 1 and ell >= 1, got V={vocab_size}, ell={ell}")
    b = max(2, round(vocab_size ** (1.0 / ell)))
    while b**ell < vocab_size:
        b += 1
    while b > 2 and (b - 1) ** ell >= vocab_size:
        b -= 1
    return b


def _powers(vocab_size: int, ell: int, device) -> torch.Tensor:
    """[b^(ell-1), ..., b, 1] made on `device` itself: torch.tensor(list, device=cuda) would be a
    blocking copy from pageable host memory on every call (exact in int64: b^ell < 2·V·b)."""
    b = base_for(vocab_size, ell)
    return torch.pow(b, torch.arange(ell - 1, -1, -1, dtype=torch.long, device=device))


def digit_table(vocab_size: int, ell: int, device=None) -> torch.Tensor:
    """DIG[V, ell]: the digits of every valid token id."""
    return subtokenize(torch.arange(vocab_size, device=device), vocab_size, ell).view(vocab_size, ell)


def subtokenize(ids: torch.Tensor, vocab_size: int, ell: int) -> torch.Tensor:
    """[..., L] token ids -> [..., L*ell] digits, token-major, most significant digit first.
    An id outside [0, V) would encode as some other token (or an invalid code): refused."""
    b = base_for(vocab_size, ell)
    outside = (ids < 0) | (ids >= vocab_size)
    if ids.device.type == "cpu":
        if ids.numel() and bool(outside.any()):
            bad = ids[outside].flatten()[0]
            raise ValueError(f"subtokenize: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    elif ids.numel():
        # an accelerator's ids are not read back (a host sync on every loss call): batches are checked
        # on the CPU before they are copied (noise.make_batch); this device-side assertion is the backstop
        torch._assert_async(~outside.any(), f"subtokenize: a token id is outside the vocabulary [0, {vocab_size})")
    digits = (ids.long().unsqueeze(-1) // _powers(vocab_size, ell, ids.device)) % b
    return digits.flatten(-2)


def desubtokenize(y: torch.Tensor, vocab_size: int, ell: int) -> torch.Tensor:
    """[..., L*ell] digits -> [..., L] codes. Raises on a mask symbol; codes >= V (invalid) are
    returned as they are, for the caller to count or reject."""
    b = base_for(vocab_size, ell)
    if (y == b).any():
        raise ValueError("desubtokenize: input still contains the mask symbol")
    digits = y.long().unflatten(-1, (y.shape[-1] // ell, ell))
    return (digits * _powers(vocab_size, ell, y.device)).sum(-1)


def apply_mask(x0: torch.Tensor, mask: torch.Tensor, vocab_size: int, ell: int) -> torch.Tensor:
    """yt: the digits of x0 with the masked sub-tokens replaced by the mask symbol b."""
    return subtokenize(x0, vocab_size, ell).masked_fill(mask, base_for(vocab_size, ell))


# --------------------------------------------------------------------------- carry-over


def consistent_classes(yt: torch.Tensor, vocab_size: int, ell: int, dig: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, V] bool: the classes whose digits agree with every unmasked sub-token of yt.
    Built digit by digit from DIG[V, ell], so no ell × V × b tensor ever exists."""
    b = base_for(vocab_size, ell)
    if dig is None:
        dig = digit_table(vocab_size, ell, yt.device)
    y = yt.unflatten(-1, (yt.shape[-1] // ell, ell))
    allowed = None
    for j in range(ell):
        yj = y[..., j].unsqueeze(-1)
        ok = (yj == b) | (dig[:, j] == yj)
        allowed = ok if allowed is None else allowed & ok
    return allowed


def carry_over_log_probs(logits: torch.Tensor, yt: torch.Tensor, vocab_size: int, ell: int) -> torch.Tensor:
    """Log-probabilities over V classes restricted to those consistent with yt's visible digits
    (fp32; -inf elsewhere). A fully unmasked token keeps one class (log p = 0); a fully masked one
    keeps all V. For ell = 1 this is MDLM's SUBS parameterisation."""
    allowed = consistent_classes(yt, vocab_size, ell)
    if not bool(allowed.any(-1).all()):
        raise ValueError("carry_over_log_probs: a position's visible digits match no valid token "
                         f"(a code >= V={vocab_size}); yt is not a noised valid sequence")
    return torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)


def plain_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Without carry-over: a plain softmax over the V classes (fp32)."""
    return torch.log_softmax(logits.float(), dim=-1)


# --------------------------------------------------------------------------- the two losses


def attended_mean(nll: torch.Tensor, attention_mask: torch.Tensor | None):
    """(nll with unattended positions zeroed, the mean over the attended ones)."""
    if attention_mask is None:
        return nll, nll.sum() / nll.numel()
    keep = attention_mask.bool()
    nll = torch.where(keep, nll, torch.zeros_like(nll))  # where, not *: no 0 × inf = nan
    return nll, nll.sum() / keep.sum().clamp(min=1)


def joint_loss(log_p: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(a) The paper's objective: -log p(x0_i | yt) / t summed over all L positions (carry-over
    makes fully unmasked tokens contribute 0), divided by the attended token count.
    Returns (nll [B, L], mean)."""
    lp = log_p.gather(-1, x0.long().unsqueeze(-1)).squeeze(-1)
    return attended_mean(-lp / t.float().unsqueeze(-1), attention_mask)


def digit_marginal_log_probs(log_p: torch.Tensor, y0: torch.Tensor, vocab_size: int, ell: int) -> torch.Tensor:
    """[B, L, ell]: log p(y^{i,j} = y0^{i,j} | yt), each digit's marginal under the joint over V:
    a log-sum-exp over the classes whose digit j equals the target digit."""
    dig = digit_table(vocab_size, ell, log_p.device)
    target = y0.unflatten(-1, (y0.shape[-1] // ell, ell))
    out = []
    for j in range(ell):
        terms = log_p.masked_fill(~(dig[:, j] == target[..., j].unsqueeze(-1)), float("-inf"))  # [B, L, V]
        # a digit no allowed class carries (yt inconsistent with x0) has mass 0: log 0 = -inf, and a
        # zero gradient — logsumexp over an all -inf row would back-propagate NaN even where unused
        empty = torch.isneginf(terms).all(-1, keepdim=True)
        lse = torch.logsumexp(terms.masked_fill(empty, 0.0), dim=-1)
        out.append(lse.masked_fill(empty.squeeze(-1), float("-inf")))
    return torch.stack(out, dim=-1)


def subtoken_elbo(log_p: torch.Tensor, x0: torch.Tensor, yt: torch.Tensor, t: torch.Tensor,
                  attention_mask: torch.Tensor | None, vocab_size: int, ell: int):
    """(b) The sub-token ELBO: (1/t) Σ over masked digits j of -log p(y0^{i,j} | yt), with the
    digit's marginal under the model's joint. A valid NLL bound per original token.
    Returns (nll [B, L], mean)."""
    b = base_for(vocab_size, ell)
    y0 = subtokenize(x0, vocab_size, ell)
    lm = digit_marginal_log_probs(log_p, y0, vocab_size, ell)
    masked = (yt == b).unflatten(-1, lm.shape[-2:])
    per_digit = torch.where(masked, -lm, torch.zeros_like(lm))
    return attended_mean(per_digit.sum(-1) / t.float().unsqueeze(-1), attention_mask)


def prime_loss(logits: torch.Tensor, x0: torch.Tensor, yt: torch.Tensor, t: torch.Tensor,
               attention_mask: torch.Tensor | None, vocab_size: int, ell: int,
               objective: str = "prime_elbo", carry_over: bool = True):
    """The training objective chosen by a recipe (model.objective, model.carry_over), dense form."""
    log_p = carry_over_log_probs(logits, yt, vocab_size, ell) if carry_over else plain_log_probs(logits)
    if objective == "prime_joint":
        return joint_loss(log_p, x0, t, attention_mask)
    if objective == "prime_elbo":
        return subtoken_elbo(log_p, x0, yt, t, attention_mask, vocab_size, ell)
    raise ValueError(f"unknown objective {objective!r}: use 'prime_joint' or 'prime_elbo'")
