"""One data-parallel rank: the DeepSpeed engine adds nothing to a plain PyTorch loop (issue 14).

ZeRO 1 and 2 partition optimizer state and gradients over the DP ranks; over one rank there is nothing
to partition, and DeepSpeed's partitioned optimizer only copied every gradient and weight through flat
buffers (1.2–1.3× the plain step at V = 50257 on CPU). fp32 over one DP rank now runs stage 0, skips the
one-rank gradient "all-reduce", and clips with a norm summed in float64 that makes no float64 copy. The
proof here is an independent computation: a hand-written loop of torch AdamW, the same clipping rule
and the same LR schedule, with no DeepSpeed, gives bit for bit the engine's losses and weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch

V, L = 97, 16
TINY = [f"model.vocab_size={V}", "model.layers=2", "model.hidden=32", "model.heads=2", f"model.seq_len={L}",
        "model.ell=2", "model.dropout=0.0", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.ema=0",
        "optim.weight_decay=0.1", "train.global_batch=8", "train.steps=6", "seed=3"]


@pytest.mark.parametrize("stage, dp, precision, runs", [
    (0, 1, "fp32", 0), (1, 1, "fp32", 0), (2, 1, "fp32", 0), (3, 1, "fp32", 3),
    (1, 2, "fp32", 1), (2, 4, "fp32", 2), (1, 1, "bf16", 1), (2, 1, "bf16", 2), (0, 1, "bf16", 0)])
def test_the_zero_stage_deepspeed_runs(stage, dp, precision, runs):
    from prime_scale.config import load_recipe, resolve_zero_stage
    from prime_scale.engine import deepspeed_config
    from prime_scale.metrics import zero_description

    cfg = load_recipe("tiny-cpu", TINY + [f"parallel.zero_stage={stage}", f"precision={precision}"])
    assert resolve_zero_stage(cfg, dp) == runs
    assert deepspeed_config(cfg, dp)["zero_optimization"]["stage"] == runs
    banner = zero_description(cfg, dp)  # what the run's first line says
    if runs == stage:
        assert banner == f"ZeRO {stage}"
    else:
        assert banner.startswith(f"ZeRO {stage} (runs as ZeRO {runs}: one data-parallel rank")


@pytest.mark.parametrize("shape", [(0,), (1,), (1023,), (1024,), (1025,), (7, 1024), (3, 5, 701), (300_001,)])
def test_sum_of_squares_is_near_float64_without_a_float64_copy(shape):
    from prime_scale.engine import sum_of_squares

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 1e-3
    exact = float(x.double().pow(2).sum())
    got = sum_of_squares(x)
    assert got.dtype == torch.float64
    assert abs(float(got) - exact) <= 1e-6 * exact, (float(got), exact)  # one chunk's float32 rounding at most


def _batches(cfg, step, gas):
    from prime_scale.noise import make_batch

    G, mb = cfg.train.global_batch, cfg.train.micro_batch
    data = torch.randint(0, V, (G, L), generator=torch.Generator().manual_seed(100 + step))
    index = torch.arange(G) + step * G
    return [make_batch(data[j * mb:(j + 1) * mb], index[j * mb:(j + 1) * mb], index[j * mb:(j + 1) * mb],
                       seed=cfg.seed, step=step, global_batch=G, vocab_size=V, ell=cfg.model.ell)
            for j in range(gas)]


class PlainLoop:
    """The model in a plain PyTorch loop: torch AdamW, the gradient norm from sum_of_squares (checked
    against float64 above), clip by clip / (norm + 1e-6) when the norm exceeds it, the recipe's LR
    schedule."""

    def __init__(self, cfg):
        from prime_scale.model import ModelArgs, PrimeObjective, PrimeTransformer
        from prime_scale.optim import lr_factor, parameter_groups

        self.cfg, o = cfg, cfg.optim
        self.model = PrimeTransformer(ModelArgs.from_config(cfg, V))
        self.objective = PrimeObjective(V, cfg.model.ell, cfg.model.objective, cfg.model.carry_over)
        self.opt = torch.optim.AdamW(parameter_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))

    def step(self, batches) -> tuple[float, float]:
        from prime_scale.engine import sum_of_squares

        total = 0.0
        for b in batches:
            _, mean = self.objective.nll(self.model(b.yt), b.x0, b.yt, b.t, b.mask)
            total += float(mean)
            (mean / len(batches)).backward()
        grads = [p.grad for group in self.opt.param_groups for p in group["params"]]  # the engine's order
        norm = float(sum(sum_of_squares(g) for g in grads).sqrt())
        clip = self.cfg.optim.clip
        if norm > clip:
            for g in grads:
                g.mul_(clip / (norm + 1e-6))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total / len(batches), norm


@pytest.mark.parametrize("stage, micro_batch", [(1, 8), (2, 4), (0, 2)])
def test_one_rank_engine_trains_exactly_as_a_plain_torch_loop(stage, micro_batch):
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.model import canonical_named_parameters
    from prime_scale.parallel import state as pstate

    # a small clip, so that every step is clipped and the clipping rule is part of what is compared
    cfg = load_recipe("tiny-cpu", TINY + [f"parallel.zero_stage={stage}", f"train.micro_batch={micro_batch}",
                                          "optim.clip=0.05"])
    st = pstate.init(cfg, environ={}, timeout_s=120)
    try:
        engine = Engine(cfg, st, V)
        assert engine.ds.zero_optimization_stage() == 0 and engine.zero_stage == 0
        assert type(engine.ds.optimizer).__name__ == "AdamW"  # torch's, on the parameters themselves
        def no_reduction(*_, **__):  # one DP rank: nothing to average, so DeepSpeed's reduction must not run
            raise AssertionError("the gradient all-reduce ran over one data-parallel rank")

        engine.ds.allreduce_gradients = no_reduction
        plain = PlainLoop(cfg)
        start = dict(canonical_named_parameters(engine.module))
        for name, p in canonical_named_parameters(plain.model):
            assert torch.equal(p, start[name]), name  # the same initial weights (seeded per layer)
        clipped = 0
        for step in range(cfg.train.steps):
            batches = _batches(cfg, step, engine.gas)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = engine.train_step(batches)
            # our clipping wraps the step torch's LR scheduler marked: no warning that it was overridden
            assert not [w for w in caught if "optimizer.step()" in str(w.message)], [str(w.message) for w in caught]
            lr = plain.sched.get_last_lr()[0]  # the rate this step uses
            loss, norm = plain.step(batches)
            assert result.loss == loss, (step, result.loss, loss)
            assert result.grad_norm == norm
            assert result.lr == lr
            clipped += norm > cfg.optim.clip
        assert clipped == cfg.train.steps
        trained = dict(canonical_named_parameters(engine.module))
        for name, p in canonical_named_parameters(plain.model):
            assert torch.equal(p, trained[name]), name
    finally:
        pstate.destroy()


def test_a_float32_overflow_of_the_norm_is_counted_again_in_float64():
    """Gradients of 1e20 overflow a float32 chunk norm (Σg² > 3e38) but not float64: the step must
    be clipped with the true norm, not dropped as non-finite."""
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.parallel import state as pstate

    cfg = load_recipe("tiny-cpu", TINY + ["train.micro_batch=8"])
    st = pstate.init(cfg, environ={}, timeout_s=120)
    try:
        engine = Engine(cfg, st, V)
        params = [p for g in engine.ds.optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.full_like(p, 1e20)
        engine._clip_before_step(engine.ds.optimizer)
        exact = sum(p.numel() for p in params) ** 0.5 * float(torch.tensor(1e20))  # 1e20 as a float32
        assert engine._norm == pytest.approx(exact, rel=1e-12)
        assert all(float(p.grad.abs().max()) <= cfg.optim.clip for p in params)  # clipped, not dropped
    finally:
        pstate.destroy()


def test_bf16_zero0_starts_from_the_initial_weights_and_a_fresh_adam():
    """bf16 without ZeRO runs DeepSpeed's FP16_UnfusedOptimizer, whose constructor takes one AdamW
    step on zero gradients (Adam's step count 1, weight decay applied once to the fp32 masters). The
    engine undoes it: the masters are the initial weights bitwise, Adam's state is empty, and the
    first real step is one plain torch AdamW step from them on the step's gradients."""
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.optim import lr_factor
    from prime_scale.parallel import state as pstate

    # no clipping (the clip factor is then exactly 1), one micro-batch: the gradient is one backward's
    cfg = load_recipe("tiny-cpu", TINY + ["parallel.zero_stage=0", "precision=bf16", "train.micro_batch=8",
                                          "optim.clip=0", "optim.warmup_steps=0"])
    st = pstate.init(cfg, environ={}, timeout_s=120)
    try:
        engine = Engine(cfg, st, V)
        wrapper = engine.ds.optimizer
        assert type(wrapper).__name__ == "FP16_UnfusedOptimizer"
        model_params = [p for group in wrapper.fp16_groups for p in group]
        masters = [p for group in wrapper.fp32_groups for p in group]
        assert all(p.dtype == torch.bfloat16 for p in model_params)
        for m, p in zip(masters, model_params):
            assert torch.equal(m, p.float())  # the initial weights: no decay applied before training
        assert not wrapper.optimizer.state  # no Adam step taken

        # the reference: torch AdamW over copies of the initial masters, fed the engine's own gradients
        copies = [m.detach().clone().requires_grad_(True) for m in masters]
        by_id = dict(zip(map(id, masters), copies))
        groups = [dict(g, params=[by_id[id(m)] for m in g["params"]]) for g in wrapper.optimizer.param_groups]
        reference = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                      lr=cfg.optim.lr * lr_factor(cfg, 0), betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps)
        grads = {}
        for p in model_params:
            p.register_post_accumulate_grad_hook(lambda q: grads.__setitem__(id(q), q.grad.detach().clone()))
        engine.train_step(_batches(cfg, 0, engine.gas))
        assert len(grads) == len(model_params)
        for c, p in zip(copies, model_params):
            c.grad = grads[id(p)].float()
        reference.step()
        for m, c, p in zip(masters, copies, model_params):
            assert torch.equal(m, c.detach())
            assert torch.equal(p, c.detach().to(torch.bfloat16))
        assert [int(s["step"]) for s in wrapper.optimizer.state.values()] == [1] * len(masters)
    finally:
        pstate.destroy()
