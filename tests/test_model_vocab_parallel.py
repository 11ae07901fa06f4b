"""The vocab-parallel Prime losses equal the dense prime_scale.prime results on the gathered tensors.

In-process: one shard holding the whole vocabulary (values and gradients vs autograd through the
dense reference, every objective, carry-over on and off, ℓ = 1, 2, 3, exact ℓ-th powers, padding).
Two gloo processes: the vocabulary split over TP = 2 (with an odd V, so one shard is padded), the
collectives counted (one MAX and one SUM all-reduce of per-token size, nothing of size V).
"""

from __future__ import annotations

import pytest
import torch

from harness.dist import launch
from prime_scale import noise, prime
from prime_scale.model import vocab_parallel as vp


def _case(V, ell, B=3, L=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * scale
    x0 = torch.randint(0, V, (B, L), generator=g)
    t, mask = noise.prime_noise(seed, 5, torch.arange(B) + 11, B, L, ell)
    # make sure fully masked, fully visible and partially masked tokens all occur
    mask[0, :ell] = True
    mask[0, ell:2 * ell] = False
    yt = prime.apply_mask(x0, mask, V, ell)
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[-1, -2:] = False
    return logits, x0, yt, t, attn


def _dense(logits, x0, yt, t, attn, V, ell, objective, carry_over):
    lg = logits.detach().clone().requires_grad_(True)
    nll, mean = prime.prime_loss(lg, x0, yt, t, attn, V, ell, objective, carry_over)
    mean.backward()
    return nll.detach(), mean.detach(), lg.grad


@pytest.mark.parametrize("V,ell", [(50, 1), (50, 2), (64, 2), (100, 3), (27, 3)])
@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
@pytest.mark.parametrize("carry_over", [True, False])
def test_single_shard_matches_dense(V, ell, objective, carry_over):
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


def tp2_worker(cases: list):
    """Each rank holds half of the (padded) vocabulary; compare with the dense result."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    group = dist.new_group(list(range(dist.get_world_size())))
    out = {f"{V}/{ell}": _tp2_case(V, ell, group) for V, ell in cases}
    dist.destroy_process_group()
    return out


def _tp2_case(V: int, ell: int, group):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    calls = []
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def spy_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(("all_reduce", str(op), list(tensor.shape)))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def spy_all_gather(*a, **k):
        calls.append(("all_gather",))
        return real_all_gather(*a, **k)

    out = {}
    local = -(-V // world)
    start = rank * local
    for objective in ("prime_elbo", "prime_joint"):
        for carry_over in (True, False):
            logits, x0, yt, t, attn = _case(V, ell, seed=3)
            ref_nll, ref_mean, ref_grad = _dense(logits, x0, yt, t, attn, V, ell, objective, carry_over)
            full = torch.cat([logits, torch.zeros(*logits.shape[:2], local * world - V)], -1)
            shard = full[..., start:start + local].clone().requires_grad_(True)
            calls.clear()
            dist.all_reduce, dist.all_gather = spy_all_reduce, spy_all_gather
            try:
                nll, mean = vp.prime_loss_parallel(shard, x0, yt, t, attn, V, ell, vocab_start=start, group=group,
                                                   objective=objective, carry_over=carry_over)
                mean.backward()
            finally:
                dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather
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
