"""The vocab-parallel Prime losses equal the dense prime_scale.prime results on the gathered tensors.

In-process: one shard holding the whole vocabulary (values and gradients vs autograd through the
dense reference, every objective, carry-over on and off, ℓ = 1, 2, 3, exact ℓ-th powers, padding),
with the digit table's products both from the digit grid and from the GEMM (prime_scale/model/digit_table.py).
Two gloo processes: the vocabulary split over TP = 2 (with an odd V, so one shard is padded), the
collectives counted (one MAX and one SUM all-reduce of per-token size, nothing of size V).
Extreme logits (digit masses far below e^-87, logits at ±1e4), in one shard and over TP = 2 and 3:
values and gradients still equal the dense reference, and inconsistent input at a removed position
gives a zero gradient, not NaN.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from harness.dist import launch
from prime_scale import prime
from prime_scale.model import digit_table
from prime_scale.model import vocab_parallel as vp


def _masked_case(V, ell, B=3, L=7, seed=0):
    """Random tokens, t, and masks (each digit masked with probability t) from one Generator, so
    fully masked, fully visible and partially masked tokens all occur; row 0 holds them for sure:
    a fully masked token 0, a fully visible token 1, and a token 2 with only its last digit masked
    (with carry-over that digit's target group is x0 alone)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (B, L), generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.1
    mask = torch.rand(B, L * ell, generator=g) < t.unsqueeze(-1)
    mask[0, :ell] = True
    mask[0, ell:3 * ell] = False
    mask[0, 3 * ell - 1] = True
    return g, x0, t, prime.apply_mask(x0, mask, V, ell)


def _case(V, ell, B=3, L=7, seed=0, scale=3.0):
    g, x0, t, yt = _masked_case(V, ell, B, L, seed)
    logits = torch.randn(B, L, V, generator=g) * scale
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[-1, -2:] = False
    return logits, x0, yt, t, attn


def _dense(logits, x0, yt, t, attn, V, ell, objective, carry_over):
    lg = logits.detach().clone().requires_grad_(True)
    nll, mean = prime.prime_loss(lg, x0, yt, t, attn, V, ell, objective, carry_over)
    mean.backward()
    return nll.detach(), mean.detach(), lg.grad


@pytest.fixture(params=["grid", "gemm"])
def digit_products(request, monkeypatch):
    """Both ways of the digit table's products (prime_scale/model/digit_table.py): the digit grid, which the
    shipped threshold keeps for b >= 32 (V > 1024 at ℓ = 2), forced on for these small V, and the GEMM."""
    monkeypatch.setattr(digit_table, "GRID_MIN_BASE", 2 if request.param == "grid" else 10**9)
    return request.param


@pytest.mark.parametrize("V,ell", [(50, 1), (50, 2), (64, 2), (100, 3), (27, 3), (1100, 2)])
@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
@pytest.mark.parametrize("carry_over", [True, False])
def test_single_shard_matches_dense(V, ell, objective, carry_over, digit_products):
    logits, x0, yt, t, attn = _case(V, ell)
    ref_nll, ref_mean, ref_grad = _dense(logits, x0, yt, t, attn, V, ell, objective, carry_over)
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, attn, V, ell, vocab_start=0, objective=objective,
                                       carry_over=carry_over)
    mean.backward()
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lg.grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fully_visible_token_costs_exactly_zero_and_padding_gets_no_gradient():
    V, ell = 30, 2
    logits, x0, yt, t, _ = _case(V, ell)
    padded = torch.cat([logits, torch.full((*logits.shape[:2], 2), 50.0)], -1).requires_grad_(True)  # 2 padding classes
    nll, mean = vp.prime_loss_parallel(padded, x0, yt, t, None, V, ell, vocab_start=0, objective="prime_joint")
    mean.backward()
    assert nll[0, 1].item() == 0.0  # token 1 of row 0 is fully visible
    assert torch.all(padded.grad[..., V:] == 0)
    ref = prime.prime_loss(logits, x0, yt, t, None, V, ell, "prime_joint")[0]
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)


def test_inconsistent_visible_digits_are_an_error_not_nan():
    V, ell = 10, 2  # b = 4: codes 10..15 are invalid
    logits = torch.zeros(1, 1, V)
    yt = torch.tensor([[3, 3]])  # code 15 fully visible
    with pytest.raises(ValueError, match="match no valid token"):
        vp.prime_loss_parallel(logits, torch.tensor([[9]]), yt, torch.tensor([0.5]), None, V, ell, vocab_start=0)


def test_bf16_logits_give_fp32_losses_close_to_dense():
    V, ell = 64, 2
    logits, x0, yt, t, attn = _case(V, ell)
    lg = logits.bfloat16().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, attn, V, ell, vocab_start=0)
    mean.backward()
    assert nll.dtype == torch.float32 and lg.grad.dtype == torch.bfloat16
    ref = prime.prime_loss(logits.bfloat16().float(), x0, yt, t, attn, V, ell, "prime_elbo")[1]
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TP = 2, two processes


@contextlib.contextmanager
def _recorded_collectives():
    """The real collectives, each call recorded as (kind, op, shape) in the list it yields."""
    import torch.distributed as dist

    calls = []
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def spy_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(("all_reduce", str(op), list(tensor.shape)))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def spy_all_gather(*a, **k):
        calls.append(("all_gather",))
        return real_all_gather(*a, **k)

    dist.all_reduce, dist.all_gather = spy_all_reduce, spy_all_gather
    try:
        yield calls
    finally:
        dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather


def tp2_worker(cases: list):
    """Each rank holds half of the (padded) vocabulary; compare with the dense result."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    group = dist.new_group(list(range(dist.get_world_size())))
    digit_table.GRID_MIN_BASE = 2  # the digit grid on these small V too: a shard's ragged ends and its grid
    out = {f"{V}/{ell}": _tp2_case(V, ell, group) for V, ell in cases}
    out["capped_positions"] = _capped_positions_over_ranks(dist.get_rank())
    dist.destroy_process_group()
    return out


def extreme_digit_case():
    """10 positions, all digits masked, each target's first-digit group 200 below the rest (its
    mass far below e^-87, where the fast path's floor would cap the cost): V, ell, logits, x0, yt, t."""
    V, ell, B, L = 50, 2, 2, 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V, (B, L), generator=g)
    y0 = prime.subtokenize(x0, V, ell).view(B, L, ell)
    logits = logits.masked_fill(prime.digit_table(V, ell)[:, 0] == y0[..., :1], -200.0)
    yt = prime.apply_mask(x0, torch.ones(B, L * ell, dtype=torch.bool), V, ell)
    return V, ell, logits, x0, yt, torch.ones(B)


def _capped_positions_over_ranks(rank: int) -> list:
    """What the training log's capped_positions reads on this rank: rank r caps 7 − r of its 10
    extreme positions (its own loss call, capacity 3 + r); summed over the ranks, then with only
    rank 0 counting (the TP peers of one replica flag the same positions)."""
    V, ell, logits, x0, yt, t = extreme_digit_case()
    totals = []
    for counts_here in (True, rank == 0):
        vp.prime_loss_parallel(logits, x0, yt, t, None, V, ell, vocab_start=0, exact_capacity=3 + rank)
        totals.append(vp.total_exact_overflow(counts_here, torch.device("cpu")))
    return totals


def _tp2_case(V: int, ell: int, group):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    local = -(-V // world)
    start = rank * local
    for objective in ("prime_elbo", "prime_joint"):
        for carry_over in (True, False):
            logits, x0, yt, t, attn = _case(V, ell, seed=3)
            ref_nll, ref_mean, ref_grad = _dense(logits, x0, yt, t, attn, V, ell, objective, carry_over)
            full = torch.cat([logits, torch.zeros(*logits.shape[:2], local * world - V)], -1)
            shard = full[..., start:start + local].clone().requires_grad_(True)
            with _recorded_collectives() as calls:
                nll, mean = vp.prime_loss_parallel(shard, x0, yt, t, attn, V, ell, vocab_start=start, group=group,
                                                   objective=objective, carry_over=carry_over)
                mean.backward()
            grad_ref = torch.cat([ref_grad, torch.zeros(*ref_grad.shape[:2], local * world - V)], -1)
            key = f"{objective}/{carry_over}"
            out[key] = {
                "nll_err": float((nll - ref_nll).abs().max()),
                "mean_err": float((mean - ref_mean).abs()),
                "grad_err": float((shard.grad - grad_ref[..., start:start + local]).abs().max()),
                "grad_scale": float(ref_grad.abs().max()),
                "calls": calls[:],
            }
    return out


def test_tp2_shards_match_dense():
    cases = [(99, 2), (37, 1), (64, 3)]  # odd V: the second shard holds a padding class
    results = launch(2, "test_model_vocab_parallel:tp2_worker", {"cases": cases}, timeout=240)
    # the training log's capped_positions: every rank's count (7 + 6), or TP rank 0's alone (7)
    assert [r.pop("capped_positions") for r in results] == [[13, 7], [13, 7]]
    for rank, per_case in enumerate(results):
        for case, res in per_case.items():
            _check_tp2_case(rank, case, res)


def _check_tp2_case(rank, case, res):
    ell = int(case.split("/")[1])
    for key, r in res.items():
        if not isinstance(r, dict):
            continue
        where = (rank, case, key, r)
        assert r["nll_err"] < 1e-5, where
        assert r["mean_err"] < 1e-6, where
        assert r["grad_err"] < 1e-5 * max(1.0, r["grad_scale"]), where
        # exactly two collectives, both of per-token size: MAX over [B, L], SUM over [B, L, k]
        kinds = [(c[0], c[1]) for c in r["calls"]]
        assert kinds == [("all_reduce", str(torch.distributed.ReduceOp.MAX)),
                         ("all_reduce", str(torch.distributed.ReduceOp.SUM))], where
        assert r["calls"][0][2] == [3, 7] and r["calls"][1][2][:2] == [3, 7], where
        assert r["calls"][1][2][2] <= 1 + ell, where


# --------------------------------------------------------------------------- extreme logits
# Shifted logits are clamped at EXP_FLOOR before exp (the fast path); a digit whose true mass lies
# below the floor must still cost exactly what the dense log-space reference says.

EXTREME_KINDS = ("group_below_floor", "one_class_far", "mixed_1e4")
EXTREME_VOCAB = {1: 50, 2: 50, 3: 100, 4: 90}  # ℓ = 4: b = 4, so codes 90..255 are invalid


def _dense64(logits, x0, yt, t, attn, V, ell, objective, carry_over):
    """The dense reference in float64, composed of prime_scale.prime's own pieces: prime_loss casts
    to fp32, where log p = (x − max) − log Z rounds by ~1e-3 at |x − max| = 2e4, and at ±1e4 that
    error is the reference's, not the code's under test."""
    lg = logits.detach().double().requires_grad_(True)
    z = lg.masked_fill(~prime.consistent_classes(yt, V, ell), float("-inf")) if carry_over else lg
    log_p = torch.log_softmax(z, dim=-1)
    if objective == "prime_joint":
        nll, mean = prime.joint_loss(log_p, x0, t, attn)
    else:
        nll, mean = prime.subtoken_elbo(log_p, x0, yt, t, attn, V, ell)
    mean.backward()
    return nll.detach().float(), mean.detach().float(), lg.grad.float()  # rounded once, at the end


def _extreme_logits(kind, g, x0, V, ell):
    B, L = x0.shape
    logits = torch.randn(B, L, V, generator=g)
    if kind == "group_below_floor":
        # every class sharing the target's digit j (j cycles with the position) sits at −200
        j = torch.arange(L) % ell
        target_digit = prime.subtokenize(x0, V, ell).view(B, L, ell).gather(-1, j.expand(B, L).unsqueeze(-1))
        same = prime.digit_table(V, ell).t()[j].unsqueeze(0) == target_digit  # [B, L, V]
        return logits.masked_fill(same, -200.0)
    if kind == "one_class_far":  # the target alone far down, its neighbours ordinary
        return logits.scatter(-1, x0.unsqueeze(-1), -1e4)
    # kind == "mixed_1e4": every class at +1e4 or −1e4 (plus noise), the target at −1e4
    far = torch.where(torch.rand(B, L, V, generator=g) < 0.5, 1e4, -1e4)
    return (logits + far).scatter(-1, x0.unsqueeze(-1), -1e4)


def _extreme_case(kind, ell, seed=0):
    V = EXTREME_VOCAB[ell]
    g, x0, t, yt = _masked_case(V, ell, seed=seed)
    attn = torch.ones(*x0.shape, dtype=torch.bool)
    attn[-1, -1] = False
    return V, _extreme_logits(kind, g, x0, V, ell), x0, yt, t, attn


def test_digit_mass_below_the_exp_floor_is_not_capped():
    """The defect's repro: all digits masked, the target's first-digit group at −200. The floor
    capped that digit's cost near 87 + log Z (89.3 instead of 204.7 for this batch)."""
    V, ell, logits, x0, yt, t = extreme_digit_case()
    ref_nll, ref_mean, ref_grad = _dense64(logits, x0, yt, t, None, V, ell, "prime_elbo", True)
    assert ref_mean > 200  # the case really is beyond the floor
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, None, V, ell, vocab_start=0)
    mean.backward()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(lg.grad, ref_grad, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("kind", EXTREME_KINDS)
@pytest.mark.parametrize("ell", [1, 2, 3, 4])
@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
@pytest.mark.parametrize("carry_over", [True, False])
def test_extreme_logits_single_shard_match_dense(kind, ell, objective, carry_over, digit_products):
    V, logits, x0, yt, t, attn = _extreme_case(kind, ell)
    # the dense reference works in log space (log_softmax, logsumexp): no floor anywhere
    ref_nll, ref_mean, ref_grad = _dense64(logits, x0, yt, t, attn, V, ell, objective, carry_over)
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, attn, V, ell, vocab_start=0, objective=objective,
                                       carry_over=carry_over)
    mean.backward()
    torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(lg.grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
def test_target_group_without_allowed_class_at_a_removed_position_gives_zero_gradient(objective):
    V, ell = 50, 2  # b = 8: codes 50..63 are invalid
    g, x0, t, yt = _masked_case(V, ell, seed=5)
    logits = torch.randn(*x0.shape, V, generator=g) * 3
    # x0 = 10 has digits (1, 2) but the visible first digit says 6: carry-over allows 48, 49 only,
    # and the masked second digit's target 2 would be code 50 >= V, so its true mass is exactly 0
    x0[1, 3] = 10
    yt[1, 3 * ell:4 * ell] = torch.tensor([6, 8])
    attn = torch.ones(*x0.shape, dtype=torch.bool)
    attn[1, 3] = False
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, attn, V, ell, vocab_start=0, objective=objective)
    mean.backward()
    assert torch.isfinite(mean) and not torch.isnan(lg.grad).any()
    assert torch.all(lg.grad[1, 3] == 0)
    ref_nll, ref_mean, ref_grad = _dense(logits, x0, yt, t, attn, V, ell, objective, True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    keep = attn.unsqueeze(-1).expand_as(lg.grad)  # the dense gradient at the removed position may be nan
    torch.testing.assert_close(lg.grad[keep], ref_grad[keep], rtol=1e-5, atol=1e-7)


def extreme_worker():
    """Every extreme case on this rank's shard of a vocabulary split over all ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    group = dist.new_group(list(range(dist.get_world_size())))
    digit_table.GRID_MIN_BASE = 2  # the digit grid, with the shards' ragged ends
    out = {}
    for kind in EXTREME_KINDS:
        for ell in (1, 2, 3, 4):
            for objective in ("prime_elbo", "prime_joint"):
                for carry_over in (True, False):
                    key = f"{kind}/{ell}/{objective}/{carry_over}"
                    out[key] = _extreme_shard_case(kind, ell, objective, carry_over, group)
    dist.destroy_process_group()
    return out


def _extreme_shard_case(kind, ell, objective, carry_over, group):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    V, logits, x0, yt, t, attn = _extreme_case(kind, ell)
    ref_nll, ref_mean, ref_grad = _dense64(logits, x0, yt, t, attn, V, ell, objective, carry_over)
    local = -(-V // world)
    start = rank * local
    pad = local * world - V  # padding classes get any logit: they are never allowed
    shard = torch.cat([logits, torch.full((*logits.shape[:2], pad), 1e4)], -1)[..., start:start + local]
    shard = shard.clone().requires_grad_(True)
    with _recorded_collectives() as calls:
        nll, mean = vp.prime_loss_parallel(shard, x0, yt, t, attn, V, ell, vocab_start=start, group=group,
                                           objective=objective, carry_over=carry_over)
        mean.backward()
    grad_ref = torch.cat([ref_grad, torch.zeros(*ref_grad.shape[:2], pad)], -1)[..., start:start + local]
    return {
        "nll_rel": float(((nll - ref_nll).abs() / ref_nll.abs().clamp(min=0.1)).max()),
        "mean_rel": float((mean - ref_mean).abs() / ref_mean.abs()),
        "grad_err": float(((shard.grad - grad_ref).abs() - 1e-4 * grad_ref.abs()).max()),
        "calls": calls[:],
    }


@pytest.mark.parametrize("world", [2, 3])
def test_extreme_logits_tp_shards_match_dense(world):
    results = launch(world, "test_model_vocab_parallel:extreme_worker", {}, timeout=300)
    B, L = 3, 7
    for key, first in results[0].items():
        ell = int(key.split("/")[1])
        for rank, per_case in enumerate(results):
            r = per_case[key]
            where = (world, rank, key, r)
            assert r["nll_rel"] < 1e-4 and r["mean_rel"] < 1e-4, where
            assert r["grad_err"] < 1e-6, where
            # every rank issues the same collectives, all of per-token size: the fast path's MAX and
            # SUM, and for rows beyond the floor one MAX and one SUM over [rows, ℓ]
            assert r["calls"] == first["calls"], where
            assert [c[1] for c in r["calls"][:2]] == [str(torch.distributed.ReduceOp.MAX),
                                                     str(torch.distributed.ReduceOp.SUM)], where
            assert len(r["calls"]) in (2, 4), where
            assert all(c[0] == "all_reduce" and c[2][0] <= B * L for c in r["calls"]), where
            assert all(torch.Size(c[2]).numel() <= B * L * (1 + ell) for c in r["calls"]), where
