"""Carry-over and both Prime losses on vocabulary shards (tensor parallelism over the output head).

Each tensor-parallel rank holds logits for the classes [vocab_start, vocab_start + V_local) (the last
shard may hold padding classes >= V, which are never allowed). The full [B, L, V] logits are never
gathered: per token position only two collectives run,
  1. all-reduce MAX of the largest allowed logit                         [B, L]
  2. all-reduce SUM of the partition function, plus either the target    [B, L, 2]      (joint, ℓ = 1)
     logit or the ℓ digit-marginal masses                                [B, L, 1 + ℓ]  (ELBO, ℓ > 1)
(plus, for the ELBO's rare positions beyond the exp floor, two of size [positions, ℓ]: see below),
and the backward pass needs no communication (its gradient is local: softmax minus target).

Cost on [B, L, V_local]: the carry-over restriction and the ℓ digit marginals are each a product with
a fixed 0/1 digit table H [V_local, ℓ·b], instead of ℓ masked passes (computed from the digits'
structure, ℓ flops per logit, and a GEMM, 2·ℓ·b, only for a shard's ragged ends: digit_table.py):
  restricted logits  z = logits + P Hᵀ, P[i, j·b + k] = −1e30 where digit j of token i is visible
                     and k is not its value (exp of an excluded logit is exactly 0);
  digit marginals    (e H)[i, j·b + k] = mass of the classes whose digit j is k.
For ℓ = 1 neither is needed: a visible token contributes exactly 0 (carry-over leaves one class).

Extreme logits. exp runs on logits clamped at EXP_FLOOR (speed, below), which is harmless for Z ≥ 1
and for the target's gathered logit (joint, ℓ = 1) but not for a digit marginal S_j whose true value
lies near or below V·e^EXP_FLOOR. The ELBO with ℓ > 1 therefore recomputes, for the rare positions
where a masked digit's S_j < EXACT_BELOW (decided on the all-reduced sums, so identically on every
rank), log S_j exactly from the unclamped logits of those positions only: a per-group max
(all-reduce MAX) and a sum below it (all-reduce SUM), both of size [positions, ℓ]. Those positions'
fp32 logits are kept for the backward pass, which overwrites their gradient rows with the exact
form. Ordinary logits never take this path: the fast path's cost and collectives are unchanged.

Host synchronisation. On an accelerator the training loss reads nothing back to the host: the check
for inconsistent input is a device-side assertion (the batch's ids were checked on the CPU before
it was copied, noise.make_batch), and a call whose caller will run a backward (`backward=True`: the
training step) takes the exact rows as a fixed number chosen on the device (exact_capacity_for:
1/256 of the call's positions, at least 16), so the collectives have a shape the host knows without
counting. Positions beyond that capacity keep the fast path's floored mass: their digit cost is
capped near 87 + log Z nats; they are counted on the device (take_exact_overflow,
total_exact_overflow). Every other call counts its rows exactly, on any device: a reported bound
never takes the capped path, and `reported_bound` turns a capped position inside its scope into an
internal error. On the CPU a host read costs nothing: the rows are always counted there (tests
emulate the accelerator's rule with FORCE_ACCELERATOR_RULE).

Definitions follow prime_scale.prime exactly (docs/method.md); tests compare against it on the
gathered tensors. All arithmetic is fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from prime_scale import prime
from prime_scale.model.digit_table import digit_onehot as _digit_onehot
from prime_scale.model.digit_table import digits as _digits
from prime_scale.model.digit_table import local_digits as _local_digits

OBJECTIVES = ("prime_joint", "prime_elbo")
EXCLUDED = -1e30  # additive penalty of a class carry-over excludes
# exp() leaves its vectorised fast path (5–50× slower) whenever the result is not a normal float;
# shifted logits are clamped here first, so an excluded class gets e ≈ 1.6e-38 instead of 0:
# nothing next to Z ≥ 1 in fp32, and padding classes are zeroed exactly afterwards
EXP_FLOOR = -87.0
# a masked digit's mass S_j (relative to the max, so Z ≥ 1) below this is recomputed exactly. The
# floor adds at most V·e^-87 ≈ V·1.6e-38 to a mass: below 1e-12 relative above the threshold for
# any V < 1e8, and only a digit costing over 46 nats falls under it, so the exact path stays rare
EXACT_BELOW = 1e-20
# positions the exact path takes per loss call where their count is not read back to the host
# (training on an accelerator): a share of the call's positions, so the cost's share is the same at
# every micro-batch. An exact row costs ≈ 4–6.5 fast-path positions (forward + backward, ℓ = 4, V/4
# classes, on the CPU), so 1/256 of the rows add ≈ 2–2.5% to the loss (a fixed 1024 rows, 25% of
# prime-7b's 2 × 2048 positions, multiplied its loss time by 2.1–2.6)
EXACT_SHARE = 256
EXACT_MIN_ROWS = 16
_OVERFLOW: dict = {}  # device -> positions beyond the capacity, accumulated on that device
_SCOPES: list = []  # the counts of the open reported_bound scopes, innermost last
# the accelerator's rule (no host reads in the loss) on the CPU too: tests set it to see the GPU's paths
FORCE_ACCELERATOR_RULE = False


def _host_read_costs(device: torch.device) -> bool:
    """Whether reading a device value back to the host stalls the loss (an accelerator's queue)."""
    return device.type != "cpu" or FORCE_ACCELERATOR_RULE


def exact_capacity_for(positions: int) -> int:
    """The exact rows a training call on an accelerator takes (B·L = `positions`)."""
    return max(EXACT_MIN_ROWS, -(-positions // EXACT_SHARE))


def _count_overflow(device: str, overflow) -> None:
    counts = _SCOPES[-1] if _SCOPES else _OVERFLOW
    counts[device] = counts.get(device, 0) + overflow


def _read(counts: dict) -> int:
    return sum(int(v) for v in counts.values() if not getattr(v, "is_meta", False))  # meta: shapes only


def take_exact_overflow() -> int:
    """Positions since the last call whose exact mass the fixed capacity left out (their cost was
    capped, see the module docstring); resets the count. Reads the device: call it where the host
    synchronises anyway (the step's logging)."""
    total = _read(_OVERFLOW)
    _OVERFLOW.clear()
    return total


def total_exact_overflow(counts_here: bool, device) -> int:
    """take_exact_overflow summed over every rank of the job: a collective, which every rank calls
    at the same point. counts_here=False for a rank whose positions another rank counts already
    (tensor-parallel peers flag the same positions: only TP rank 0 counts); ranks that run no loss
    (the first pipeline stages) add their 0."""
    local = take_exact_overflow()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local if counts_here else 0
    total = torch.tensor([local if counts_here else 0], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


@contextlib.contextmanager
def reported_bound(what: str):
    """The scope of a figure reported as a bound (evaluation, validation, the lm-eval scores):
    autograd off, and every position's digit mass exact. Those calls never take the capped path
    (backward=False); a capped position inside the scope is an internal error, never a low score."""
    counts: dict = {}
    _SCOPES.append(counts)
    try:
        with torch.no_grad():
            yield
    finally:
        _SCOPES.pop()  # this scope's own entry: scopes nest, and equal counts must not be confused
    overflow = _read(counts)
    if overflow:
        raise RuntimeError(f"{what}: {overflow} positions of a reported bound took the loss's capped "
                           "path (their cost is too low, so the figure is no bound); this is a bug: "
                           "bound computations must call the loss with backward=False")


def _restricted_logits(logits, yt, vocab_size: int, ell: int, vocab_start: int, carry_over: bool):
    """fp32 copy of the logits shard with carry-over's excluded classes at ≈ −1e30 (ℓ > 1) and the
    padding classes at −inf. For ℓ = 1 carry-over acts through the row weights instead."""
    B, L, local = logits.shape
    # exactly one private fp32 tensor of the shard's size: bf16's .float() already is a copy (a
    # .clone() after it, or addmm's output next to it, doubled the peak: 13 GB at owt-base's B = 64)
    copied = logits.dtype != torch.float32
    if carry_over and ell > 1:
        b = prime.base_for(vocab_size, ell)
        y = yt.reshape(B * L, ell)
        digits = torch.arange(b, device=yt.device)
        exclude = (y != b).unsqueeze(-1) & (digits != y.unsqueeze(-1))  # [B·L, ℓ, b]
        penalty = torch.where(exclude, EXCLUDED, 0.0).view(B * L, ell * b)
        flat = logits.reshape(B * L, local)
        z = flat.float() if copied else flat.clone()
        _digits(vocab_size, ell, vocab_start, local, str(logits.device)).add_product(z, penalty)
        z = z.view(B, L, local)
    else:
        z = logits.float() if copied else logits.clone()
    valid = min(max(vocab_size - vocab_start, 0), local)
    if valid < local:
        z[..., valid:] = float("-inf")
    return z


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _shift_by_max(z, group, vocab_size):
    """(z − max in place, max [B, L]), with the max of the allowed logits all-reduced over the shards."""
    zmax = _all_reduce(z.amax(-1), dist.ReduceOp.MAX, group)
    bad = (zmax < EXCLUDED / 2).any()
    message = ("vocab-parallel Prime loss: a position's visible digits match no valid token "
               f"(a code >= V={vocab_size}); yt is not a noised valid sequence")
    if not _host_read_costs(zmax.device):
        if bool(bad):
            raise ValueError(message)
    else:
        # no host read on an accelerator: a batch of make_batch was checked on the CPU already
        torch._assert_async(~bad, message)
    return z.sub_(zmax.unsqueeze(-1)), zmax


def _exp(z, vocab_size: int, vocab_start: int):
    """e = exp(z) in place on the shifted logits (the private fp32 copy becomes e)."""
    e = z.clamp_(min=EXP_FLOOR).exp_()
    valid = min(max(vocab_size - vocab_start, 0), e.shape[-1])
    if valid < e.shape[-1]:
        e[..., valid:] = 0.0
    return e


def _exact_rows(logits, rows, x0, yt, key, carry_over: bool, group):
    """For the positions `rows` (flat indices into B·L): their logits x [n, V_local] (fp32, −inf on
    the classes carry-over excludes and on padding), target digits [n, ℓ], and for each target group
    its largest logit g_j and log Σ_group exp(x_c − g_j) [n, ℓ], over all shards. Raw logits, not
    z − max: the difference of two close logits is exact in fp32, which x − max (±1e4 apart) is not.
    A group with no allowed class (possible only for inconsistent input) gets g_j = 0, log-sum −inf.
    Each exponent is clamped at EXP_FLOOR too (speed): the group's sum is ≥ 1 (its largest term is
    exactly 1), so the at most V·1.6e-38 this adds is nothing; −inf classes are left out by a where."""
    vocab_size, ell = key[:2]
    b = prime.base_for(vocab_size, ell)
    dig = _local_digits(*key)
    L = logits.shape[1]
    x = logits[rows // L, rows % L].float()  # indexing, not reshape: never a copy of the whole shard
    # the allowed set from the digits themselves, not from the −1e30 penalty: exactly −inf outside it
    allowed = dig[:, 0] >= 0
    if carry_over:
        y = yt.reshape(-1, ell).index_select(0, rows)
        for j in range(ell):
            allowed = allowed & ((y[:, j:j + 1] == b) | (dig[:, j] == y[:, j:j + 1]))
    x = x.masked_fill(~allowed, float("-inf"))
    target = prime.subtokenize(x0.reshape(-1).index_select(0, rows), vocab_size, ell).view(-1, ell)
    member = [allowed & (dig[:, j] == target[:, j:j + 1]) for j in range(ell)]  # each group's allowed classes
    gmax = _all_reduce(torch.stack([x.masked_fill(~m, float("-inf")).amax(-1) for m in member], -1),
                       dist.ReduceOp.MAX, group)
    shift = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))  # never −inf − (−inf)
    below = [torch.where(m, (x - shift[:, j:j + 1]).clamp_(min=EXP_FLOOR).exp_(), 0.0).sum(-1)
             for j, m in enumerate(member)]
    return x, target, shift, _all_reduce(torch.stack(below, -1), dist.ReduceOp.SUM, group).log()


def _static_rows(flag: torch.Tensor, capacity: int):
    """The first min(capacity, N) flagged positions of flag [N], chosen on the device: (rows [k]
    long, live [k] bool: the slot holds a flagged row, the others hold row 0; take0: row 0 is
    flagged and so in slot 0, overflow: flagged rows beyond the capacity, a device scalar)."""
    n = flag.numel()
    k = min(capacity, n)
    slot = flag.long().cumsum(0) - 1  # the k-th flagged row goes to slot k
    take = flag & (slot < k)
    # rows not taken all land in the extra slot k, which is dropped: a duplicate there is harmless
    rows = torch.zeros(k + 1, dtype=torch.long, device=flag.device).scatter_(
        0, torch.where(take, slot, k), torch.arange(n, device=flag.device))[:k]
    count = take.sum()
    live = torch.arange(k, device=flag.device) < count
    return rows, live, take[:1], flag.sum() - count


def _write_rows(target: torch.Tensor, rows, values, live, take0) -> None:
    """target[rows] = values, where the slots that are not live (they point at row 0) write row 0's
    own final value: every write to one row is then the same, so the result does not depend on the
    order of the duplicates."""
    if live is not None:
        pad = torch.where(take0, values[0], target[0])
        values = torch.where(live.unsqueeze(-1), values, pad)
    target.index_copy_(0, rows, values)


def _elbo_forward(logits, z, zmax, x0, yt, masked, key, carry_over: bool, group, capacity=None):
    """(Σ_j m_j (log Z − log S_j) [B, L], the tensors backward needs) from the shifted logits z,
    which become e in place. Positions where a masked S_j < EXACT_BELOW get log S_j from _exact_rows."""
    vocab_size, ell, vocab_start, local, _ = key
    B, L, _ = z.shape
    b = prime.base_for(vocab_size, ell)
    e = _exp(z, vocab_size, vocab_start)
    mass = _digits(*key).mass(e.view(B * L, local)).view(B, L, ell * b)  # every digit value's mass
    y0 = prime.subtokenize(x0, vocab_size, ell).reshape(B, L, ell)
    cols = y0 + torch.arange(ell, device=y0.device) * b
    parts = torch.cat([mass[..., :b].sum(-1, keepdim=True), mass.gather(-1, cols)], -1)  # Z, S_j
    sums = _all_reduce(parts, dist.ReduceOp.SUM, group)
    # S_j ≥ the floored mass of its group > 0, so the log is finite; exact below the threshold
    log_s = sums[..., 1:].clamp_min(torch.finfo(torch.float32).tiny).log()
    # decided on all-reduced sums and on yt alone: every rank flags the same rows, so every rank
    # issues the same collectives (or none). With a capacity, the shapes come from B·L alone and
    # nothing is read back to the host (see the module docstring)
    flag = (masked & (sums[..., 1:] < EXACT_BELOW)).any(-1).view(-1)
    exact = (None,) * 8
    if capacity is None:
        rows, live, take0 = flag.nonzero().squeeze(-1), None, None
    else:
        rows, live, take0, overflow = _static_rows(flag, capacity)
        _count_overflow(str(flag.device), overflow)
    if rows.numel():
        x_rows, target_rows, shift, log_sum = _exact_rows(logits, rows, x0, yt, key, carry_over, group)
        zmax_rows = zmax.reshape(-1).index_select(0, rows)
        _write_rows(log_s.view(B * L, ell), rows, (shift - zmax_rows.unsqueeze(-1)) + log_sum, live, take0)
        exact = (rows, x_rows, target_rows, shift, log_sum, zmax_rows, live, take0)
    nll = torch.where(masked, sums[..., :1].log() - log_s, torch.zeros_like(log_s)).sum(-1)
    return nll, (e, sums, cols, masked, *exact)


def _exact_grad(x, target, shift, log_sum, zmax, log_z, masked, w, dig):
    """w (n·exp(z_c − log Z) − Σ_j m_j [digit_j(c) = y0_j] exp(z_c − log S_j)) on the exact rows
    [n, V_local] (z = x − max, log S_j = g_j − max + log-sum_j; each exponent formed from close
    values, see _exact_rows). A group with no allowed class (log-sum −inf) adds nothing: inconsistent
    input, which only sits at removed positions (w = 0), gets a zero gradient, never 0·inf = NaN.
    Exponents are clamped at EXP_FLOOR (speed; an error below 1.6e-38·w per class); the classes
    outside the allowed set (x = −inf, finite logits elsewhere) get exactly 0 through a where."""
    allowed = torch.isfinite(x)
    base = ((x - zmax.unsqueeze(-1)) - log_z.unsqueeze(-1)).clamp_(min=EXP_FLOOR).exp_()
    grad = torch.where(allowed, base.mul_(masked.sum(-1, keepdim=True).float()), 0.0)
    finite = torch.isfinite(log_sum)
    safe = torch.where(finite, log_sum, torch.zeros_like(log_sum))
    for j in range(masked.shape[-1]):
        use = allowed & (masked[:, j] & finite[:, j]).unsqueeze(-1) & (dig[:, j] == target[:, j:j + 1])
        grad.sub_(torch.where(use, ((x - shift[:, j:j + 1]) - safe[:, j:j + 1]).clamp_(min=EXP_FLOOR).exp_(), 0.0))
    return grad.mul_(w.unsqueeze(-1))


class _PrimeNLL(torch.autograd.Function):
    """Per-token Prime loss nll[B, L] (weighted by 1/t) from a logits shard. With e = exp(z − max)
    on allowed classes (0 elsewhere), Z = Σ e, S_j = mass of the classes whose digit j is the
    target's, m_j = digit j masked, n = Σ m_j, w = upstream gradient / t:
      joint  nll = (log Z − (z_x0 − max)) / t          ∂/∂z_c = w (e_c / Z − [c = x0])
      ELBO   nll = Σ_j m_j (log Z − log S_j) / t       ∂/∂z_c = w e_c (n / Z − Σ_j m_j [digit_j(c) = y0_j] / S_j)
    For ℓ = 1 both are the joint form on the rows that count (the ELBO's S_0 is the target's mass).
    The ELBO's rows beyond the exp floor use the same formula in log space (_exact_grad)."""

    @staticmethod
    def forward(ctx, logits, x0, yt, t, vocab_size, ell, vocab_start, objective, carry_over, group, capacity):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
        B, L, local = logits.shape
        b = prime.base_for(vocab_size, ell)
        masked = (yt == b).reshape(B, L, ell)
        t = t.float().unsqueeze(-1)
        z, zmax = _shift_by_max(_restricted_logits(logits, yt, vocab_size, ell, vocab_start, carry_over),
                                group, vocab_size)
        ctx.key = (vocab_size, ell, vocab_start, local, str(logits.device))
        ctx.use_digits = objective == "prime_elbo" and ell > 1
        ctx.logits_dtype = logits.dtype
        if ctx.use_digits:
            nll, saved = _elbo_forward(logits, z, zmax, x0, yt, masked, ctx.key, carry_over, group, capacity)
            ctx.save_for_backward(*saved, t)
            return nll / t
        x0_local = x0.long() - vocab_start
        owned = (x0_local >= 0) & (x0_local < local)
        idx = x0_local.clamp(0, local - 1).unsqueeze(-1)
        # the target's shifted logit z_x0 − max, from the rank that owns it (x0 is always allowed);
        # gathered before the exp floor, so the joint loss is exact for any logits
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
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if not ctx.use_digits:
            e, sums, idx, owned, counts, t = ctx.saved_tensors
            w = torch.where(counts, grad_nll.float() / t, torch.zeros_like(t))
            grad = e.mul_((w / sums[..., 0]).unsqueeze(-1))
            grad.scatter_add_(-1, idx, torch.where(owned, -w, torch.zeros_like(w)).unsqueeze(-1))
            return grad.to(ctx.logits_dtype), *(None,) * 10
        e, sums, cols, masked, rows, x_rows, target_rows, shift, log_sum, zmax_rows, live, take0, t = ctx.saved_tensors
        B, L, local = e.shape
        digits = _digits(*ctx.key)
        w = grad_nll.float() / t  # [B, L]
        per_token = w * masked.sum(-1) / sums[..., 0]  # w n / Z
        coef = torch.zeros(B, L, digits.ell * digits.b, device=e.device)
        coef.scatter_(-1, cols, torch.where(masked, w.unsqueeze(-1) / sums[..., 1:], torch.zeros_like(sums[..., 1:])))
        # w (n/Z − Σ_j m_j [digit_j(c) = y0_j] / S_j) for every class
        factor = digits.factor(per_token.view(B * L, 1), coef.view(B * L, -1), local)
        grad = e.mul_(factor.view(B, L, local))
        if rows is not None:
            # on these rows the floored e (and 1/S_j, which may overflow) made the fast form wrong:
            # the exact form replaces the rows whole
            log_z = sums[..., 0].reshape(-1).index_select(0, rows).log()
            masked_rows = masked.reshape(B * L, -1).index_select(0, rows)
            exact = _exact_grad(x_rows, target_rows, shift, log_sum, zmax_rows, log_z, masked_rows,
                                w.reshape(-1).index_select(0, rows), _local_digits(*ctx.key))
            _write_rows(grad.view(B * L, local), rows, exact, live, take0)
        return grad.to(ctx.logits_dtype), *(None,) * 10


def prime_loss_parallel(logits_shard, x0, yt, t, attention_mask, vocab_size: int, ell: int, *,
                        vocab_start: int, group=None, objective: str = "prime_elbo", carry_over: bool = True,
                        backward: bool = False, exact_capacity: Optional[int] = None):
    """(nll [B, L], mean) of the chosen objective from this rank's logits shard. Every rank of the
    tensor-parallel `group` gets the same values; gradients flow to the local shard only.
    backward: the caller will run a backward of this loss (the training step). On an accelerator only
    such a call takes a fixed capacity of exact rows (module docstring); every other call is exact.
    exact_capacity: that fixed count, given explicitly (any device)."""
    capacity = exact_capacity
    if capacity is None and backward and _host_read_costs(logits_shard.device):
        capacity = exact_capacity_for(logits_shard.shape[0] * logits_shard.shape[1])
    nll = _PrimeNLL.apply(logits_shard, x0, yt, t, vocab_size, ell, vocab_start, objective, carry_over, group,
                          capacity)
    return prime.attended_mean(nll, attention_mask)
