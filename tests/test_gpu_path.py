"""The production (CUDA, bf16, NCCL) path: what must hold there, checked on the CPU where the logic
allows, and on a GPU by the tests marked `gpu` (skipped, with the reason, without one).

CPU: bf16 gradients accumulate in fp32 inside the real DeepSpeed engine; the loss and the batch copy
issue no host synchronisation by construction (no data-dependent host reads on accelerator tensors).
GPU: the same with torch.cuda.set_sync_debug_mode("error") around one loss call, inference on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import test_model_vocab_parallel as vpt
from prime_scale import prime
from prime_scale.model import vocab_parallel as vp

V, L = 300, 16
TINY = [f"model.vocab_size={V}", "model.layers=1", "model.hidden=64", "model.heads=4", f"model.seq_len={L}",
        "model.ell=2", "model.objective=prime_elbo", "train.global_batch=4", "train.micro_batch=2",
        "optim.warmup_steps=0", "optim.ema=0", "precision=bf16"]



def needs_cuda(test):
    """A GPU-only test (marker `gpu`), skipped with its reason on a machine without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the check is of CUDA "
                              "host synchronisation / device placement, which the CPU build does not have")
    return pytest.mark.gpu(skip(test))


def _micro_batch(step: int = 0, rows: int = 2):
    from prime_scale.noise import make_batch

    data = torch.randint(0, V, (rows, L), generator=torch.Generator().manual_seed(step))
    index = torch.arange(rows)
    return make_batch(data, index, index, seed=0, step=step, global_batch=4, vocab_size=V, ell=2)


# --------------------------------------------------------------------------- 1. fp32 gradient accumulation


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_deepspeed_config_accumulates_in_fp32_where_deepspeed_allows(stage):
    from prime_scale.config import load_recipe
    from prime_scale.engine import deepspeed_config

    cfg = load_recipe("tiny-cpu", TINY + [f"parallel.zero_stage={stage}"])
    ds = deepspeed_config(cfg, dp=1)
    # DeepSpeed refuses bf16 + fp32 accumulation without ZeRO (NotImplementedError): left out there
    assert ds.get("data_types") == (None if stage == 0 else {"grad_accum_dtype": "fp32"})
    fp32 = deepspeed_config(load_recipe("tiny-cpu", TINY[:-1] + [f"parallel.zero_stage={stage}"]), dp=1)
    assert "data_types" not in fp32


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_gradients_accumulate_in_fp32_inside_the_engine(stage):
    """One bf16 micro-batch of two: the gradient lands in the optimizer's fp32 accumulation buffer
    (ZeRO 1: DeepSpeed's BF16_Optimizer; ZeRO 2: the stage-1/2 optimizer's fp32 partitions), not in
    bf16 param.grad, and the second micro-batch adds to it there."""
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.parallel import state as pstate

    cfg = load_recipe("tiny-cpu", TINY + [f"parallel.zero_stage={stage}"])
    st = pstate.init(cfg, environ={}, timeout_s=120)
    try:
        engine = Engine(cfg, st, V)
        assert engine.gas == 2
        opt = engine.ds.optimizer
        b = _micro_batch()
        engine.ds.train()
        engine.ds.backward(engine.ds(b.yt, b.x0, b.t, b.mask))
        if stage == 1:
            assert type(opt).__name__ == "BF16_Optimizer"
            buffers = opt.fp32_groups_gradients_flat
        else:
            assert opt.gradient_accumulation_dtype == torch.float32
            # ZeRO 2 reduces each micro-batch into this rank's flat gradient partition
            buffers = [opt.averaged_gradients[i].flat_partition for i in opt.averaged_gradients]
        assert buffers and all(x.dtype == torch.float32 for x in buffers)
        assert any(bool(x.abs().sum() > 0) for x in buffers)
        assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    finally:
        pstate.destroy()


# --------------------------------------------------------------------------- 2. no host syncs in the loss


class _HostTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that moves a host tensor (not a 0-dim scalar) onto another device: on a GPU
    each is a blocking copy from pageable memory."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        host = [a for a in flat if isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if host and any(o.device.type != "cpu" for o in outs):
            self.copies.append(str(func))
        return out


def _loss_inputs(ell: int, device):
    from prime_scale.noise import make_batch

    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, V, (2, L), generator=g)
    index = torch.arange(2)
    b = make_batch(data, index, index, seed=0, step=0, global_batch=2, vocab_size=V, ell=ell)
    logits = torch.randn(2, L, V, generator=g) * 3
    return logits.to(device).requires_grad_(True), b.to(device)


@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
@pytest.mark.parametrize("ell,carry_over", [(1, True), (2, True), (2, False), (3, True)])
def test_a_training_loss_call_reads_nothing_back_from_the_device(objective, ell, carry_over):
    """The meta device holds no data, so every host read (bool(), .item(), nonzero(), a count that
    sizes a tensor) raises there: a loss call with its backward that runs on meta cannot synchronise
    a GPU. And after the first call (cached digit tables), it copies nothing from the host."""
    from prime_scale.model import PrimeObjective

    objective_fn = PrimeObjective(V, ell, objective, carry_over)
    for call in range(2):
        logits, b = _loss_inputs(ell, "meta")
        with _HostTraffic() as traffic:
            loss = objective_fn(logits, b.labels())
            loss.backward()
        assert logits.grad.shape == logits.shape and loss.shape == ()
        if call == 1:
            assert traffic.copies == []


@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
@pytest.mark.parametrize("ell", [1, 2])
@needs_cuda
def test_no_host_sync_in_one_loss_call_on_a_gpu(objective, ell):
    from prime_scale.model import PrimeObjective

    fn = PrimeObjective(V, ell, objective, True)
    logits, b = _loss_inputs(ell, "cuda")
    fn(logits, b.labels()).backward()  # warm-up: the digit tables are copied once, then cached
    logits, b = _loss_inputs(ell, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(logits, b.labels()).backward()
        b.to("cuda")  # a second copy of a device batch: nothing to do, nothing to wait for
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits.grad).all()


@needs_cuda
def test_batch_copy_to_a_gpu_is_pinned_and_asynchronous():
    b = _micro_batch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = b.to("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.equal(x.cpu(), y) for x, y in zip(on_gpu.labels(), b.labels()))
    assert on_gpu.x0.device.type == "cuda"



# --------------------------------------------------------------------------- 3. inference on the GPU


@needs_cuda
def test_a_loaded_model_samples_on_its_gpu_with_a_seeded_device_generator():
    from prime_scale.inference import LoadedModel, _on_host
    from prime_scale.sampling import ancestral_sample

    ell, b = 2, 18  # V = 300: b = 18
    net = torch.nn.Sequential(torch.nn.Embedding(b + 1, 16), torch.nn.Unflatten(1, (L, ell)), torch.nn.Flatten(2),
                              torch.nn.Linear(ell * 16, V)).cuda()
    loaded = LoadedModel(net, None, V, ell, None, None, "raw", torch.device("cuda", torch.cuda.current_device()))
    runs = [_on_host(ancestral_sample(loaded.logits, 3, L, V, ell, 8, generator=loaded.generator(s)))
            for s in (1, 1, 2)]
    assert loaded.logits(torch.zeros(1, L * ell, dtype=torch.long)).device.type == "cuda"
    assert torch.equal(runs[0].tokens, runs[1].tokens) and not torch.equal(runs[0].tokens, runs[2].tokens)
    assert runs[0].tokens.device.type == "cpu"


# --------------------------------------------------------------------------- 2b. the exact rows' fixed capacity
# (tests/test_model_vocab_parallel.py's extreme cases and dense float64 reference)

# On an accelerator (training) the exact rows are a fixed number chosen on the device: the same
# values as the counted path whenever they fit, and the left-out positions counted when they do not.


@pytest.mark.parametrize("kind", vpt.EXTREME_KINDS)
@pytest.mark.parametrize("ell", [2, 3])
@pytest.mark.parametrize("capacity", [21, 64])  # B·L = 21: exactly every position, and more than B·L
def test_fixed_capacity_exact_rows_match_dense(kind, ell, capacity):
    V, logits, x0, yt, t, attn = vpt._extreme_case(kind, ell)
    ref_nll, ref_mean, ref_grad = vpt._dense64(logits, x0, yt, t, attn, V, ell, "prime_elbo", True)
    vp.take_exact_overflow()
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, attn, V, ell, vocab_start=0, exact_capacity=capacity)
    mean.backward()
    assert vp.take_exact_overflow() == 0
    torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(lg.grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("first_flagged", [True, False])
def test_fixed_capacity_with_free_slots_leaves_row_zero_right(first_flagged):
    """Free slots point at row 0 and write its own final value: right whether row 0 is exact or not."""
    V, ell, B, L = 50, 2, 2, 5
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V, (B, L), generator=g)
    y0 = prime.subtokenize(x0, V, ell).view(B, L, ell)
    far = prime.digit_table(V, ell)[:, 0] == y0[..., :1]  # [B, L, V]: the target's first-digit group
    far[0, 0] &= first_flagged
    far[1, 2:] = False  # 2 of the 10 positions not beyond the floor (3 with row 0 left out)
    logits = logits.masked_fill(far, -200.0)
    yt = prime.apply_mask(x0, torch.ones(B, L * ell, dtype=torch.bool), V, ell)
    t = torch.ones(B)
    ref = [logits.clone().requires_grad_(True) for _ in range(2)]
    counted = vp.prime_loss_parallel(ref[0], x0, yt, t, None, V, ell, vocab_start=0)
    fixed = vp.prime_loss_parallel(ref[1], x0, yt, t, None, V, ell, vocab_start=0, exact_capacity=9)
    counted[1].backward()
    fixed[1].backward()
    assert vp.take_exact_overflow() == 0
    torch.testing.assert_close(fixed[0], counted[0], rtol=0, atol=0)
    torch.testing.assert_close(ref[1].grad, ref[0].grad, rtol=0, atol=0)


def test_positions_beyond_the_capacity_are_counted_and_the_rest_stay_exact():
    V, ell, B, L = 50, 2, 2, 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V, (B, L), generator=g)
    y0 = prime.subtokenize(x0, V, ell).view(B, L, ell)
    logits = logits.masked_fill(prime.digit_table(V, ell)[:, 0] == y0[..., :1], -200.0)  # all 10 flagged
    yt = prime.apply_mask(x0, torch.ones(B, L * ell, dtype=torch.bool), V, ell)
    t = torch.ones(B)
    ref_nll, _, ref_grad = vpt._dense64(logits, x0, yt, t, None, V, ell, "prime_elbo", True)
    vp.take_exact_overflow()
    lg = logits.clone().requires_grad_(True)
    nll, mean = vp.prime_loss_parallel(lg, x0, yt, t, None, V, ell, vocab_start=0, exact_capacity=3)
    mean.backward()
    assert vp.take_exact_overflow() == 7 and vp.take_exact_overflow() == 0
    # the first 3 positions (row-major) are exact; the others keep the floored, capped cost
    torch.testing.assert_close(nll.view(-1)[:3], ref_nll.view(-1)[:3], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(lg.grad.view(B * L, V)[:3], ref_grad.view(B * L, V)[:3], rtol=0.0, atol=1e-6)
    assert bool((nll.view(-1)[3:] < ref_nll.view(-1)[3:] - 50).all())


def test_under_the_accelerators_rule_only_a_backward_call_is_capped(monkeypatch):
    """The cap follows the caller's `backward`, not grad mode: a call without it is exact on an
    accelerator whatever grad mode says, one with it is capped even under no_grad."""
    V, ell, logits, x0, yt, t = vpt.extreme_digit_case()
    ref_nll = vpt._dense64(logits, x0, yt, t, None, V, ell, "prime_elbo", True)[0]
    monkeypatch.setattr(vp, "FORCE_ACCELERATOR_RULE", True)
    monkeypatch.setattr(vp, "EXACT_MIN_ROWS", 3)  # capacity 3 of the 10 flagged positions
    vp.take_exact_overflow()
    exact, _ = vp.prime_loss_parallel(logits.clone().requires_grad_(True), x0, yt, t, None, V, ell, vocab_start=0)
    assert vp.take_exact_overflow() == 0
    torch.testing.assert_close(exact, ref_nll, rtol=1e-4, atol=0.0)
    with torch.no_grad():
        capped, _ = vp.prime_loss_parallel(logits, x0, yt, t, None, V, ell, vocab_start=0, backward=True)
    assert vp.take_exact_overflow() == 7
    assert bool((capped.view(-1)[3:] < ref_nll.view(-1)[3:] - 50).all())


def test_a_capped_position_inside_a_reported_bound_is_an_internal_error():
    V, ell, logits, x0, yt, t = vpt.extreme_digit_case()
    vp.take_exact_overflow()
    with pytest.raises(RuntimeError, match="7 positions of a reported bound took the loss's capped path"):
        with vp.reported_bound("evaluation"):
            assert not torch.is_grad_enabled()
            vp.prime_loss_parallel(logits, x0, yt, t, None, V, ell, vocab_start=0, exact_capacity=3)
    assert vp.take_exact_overflow() == 0  # the scope's count is its own: the training's is untouched
    with vp.reported_bound("evaluation"):
        vp.prime_loss_parallel(logits, x0, yt, t, None, V, ell, vocab_start=0)


def test_the_capacity_is_a_share_of_the_calls_positions():
    # prime-7b's micro-batch (2 × 2048 positions) and owt-base's (64 × 1024)
    assert vp.exact_capacity_for(2 * 2048) == 16 and vp.exact_capacity_for(64 * 1024) == 256
    assert vp.exact_capacity_for(10) == vp.EXACT_MIN_ROWS
