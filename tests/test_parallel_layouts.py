"""Layout equivalence: the same global batches give the same training losses under every layout.

Real DeepSpeed engines and megatron-core layers on gloo. A tiny Prime model (ℓ = 2, ELBO objective,
clipping and EMA on) trains 4 steps on fixed global batches:
  one process:   TP1·PP1·DP1 under ZeRO 0, 1, 2, 3 (the references; fp32 over one DP rank runs 1 and 2
                 as 0, config.resolve_zero_stage)
  two processes: TP2 and PP2 (ZeRO 1; DP 1, so run as 0), DP2 under ZeRO 1, 2, 3 (real partitions),
                 and PP2 in bf16
  four processes: TP2 × DP2 under ZeRO 1 (a real fp32 partition of TP-sharded parameters: one
                 process and DP 1 run ZeRO 1 as 0, so nothing else covers it)
fp32 layouts must match their reference within 1e-5 (losses, validation sums) and start from the
same weights (gathered over TP and pipeline stages); bf16 must stay close. The two-process job
also checks that a DeepSpeed topology disagreeing with megatron's groups is refused.
"""

from __future__ import annotations

import pytest

from harness.dist import launch

V, L, STEPS, ROWS = 300, 16, 4, 64
BASE = [f"model.vocab_size={V}", "model.layers=2", "model.hidden=64", "model.heads=4", f"model.seq_len={L}",
        "model.ell=2", "model.objective=prime_elbo", "train.global_batch=8", "train.micro_batch=2",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.clip=1.0", "optim.ema=0.5", f"train.steps={STEPS}"]


def _fingerprints(engine, state):
    """Per canonical parameter of the whole model: (sum, sum of squares, first values), gathered
    over TP shards and pipeline stages (ZeRO ≤ 2: every rank holds its whole slice)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from prime_scale.model import canonical_named_parameters

    out = {}
    for name, p in canonical_named_parameters(engine.module):
        full = p.detach().float()
        if getattr(p, "tensor_model_parallel", False) and state.tp > 1:
            parts = [torch.empty_like(full) for _ in range(state.tp)]
            dist.all_gather(parts, full.contiguous(), group=mps.get_tensor_model_parallel_group())
            full = torch.cat(parts, dim=p.partition_dim)
        full = full[:V] if name.endswith("out.weight") else full  # drop the head's padding rows
        out[name] = [float(full.sum()), float(full.pow(2).sum()), [float(x) for x in full.flatten()[:4]]]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, out)
    merged = {}
    for part in everyone:
        merged.update(part)
    return merged


def run_layouts(layouts: list):
    """Train every layout in turn in this process group; rank 0 returns the records."""
    import torch
    import torch.distributed as dist

    from harness.dist import port
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.noise import make_batch
    from prime_scale.parallel import state as pstate

    data = torch.randint(0, V, (ROWS, L), generator=torch.Generator().manual_seed(0))
    records = []
    for k, overrides in enumerate(layouts):
        cfg = load_recipe("tiny-cpu", BASE + overrides)
        st = pstate.init(cfg, environ=port(k), timeout_s=120)
        engine = Engine(cfg, st, V)
        reductions = _count_gradient_reductions(engine)
        weights = _fingerprints(engine, st) if cfg.parallel.zero_stage < 3 else None
        G, mb = cfg.train.global_batch, cfg.train.micro_batch
        losses, norms = [], []
        for step in range(STEPS):
            batches = []
            for j in range(engine.gas):  # this rank's share of global batch `step`
                first = step * G + (j * st.dp + st.dp_rank) * mb
                index = torch.arange(first, first + mb)
                batches.append(make_batch(data[index % ROWS], index, index, seed=0, step=step, global_batch=G,
                                          vocab_size=V, ell=cfg.model.ell))
            result = engine.train_step(batches)
            losses.append(result.loss)
            norms.append(result.grad_norm)
        vetoed = _vetoed_step(engine, batches)
        before = [p.detach().clone() for p in engine.module.parameters()]
        val = _validation_sums(engine, batches, st)  # EMA weights
        extra = {}
        if st.world_size == 1 and cfg.parallel.zero_stage == 1:
            extra["independent_val"] = _dense_validation(engine, batches, cfg)
            extra["weights_restored"] = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
            extra["val_raw"] = _validation_sums(engine, batches, st, use_ema=False)
        if layouts[k] == ["parallel.pp=2"]:
            extra["refused"] = _wrong_topology_is_refused(st)
        records.append({"layout": overrides, "losses": losses, "norms": norms, "val": val, "weights": weights,
                        "dp": st.dp, "tp": st.tp, "gas": engine.gas, "vetoed": vetoed, "reductions": reductions[0],
                        "zero_run": engine.ds.zero_optimization_stage(),
                        "optimizer": type(engine.ds.optimizer).__name__, **extra})
        dist.barrier()
        pstate.destroy()
    return records


def _count_gradient_reductions(engine):
    """[calls of DeepSpeed's DP gradient all-reduce], counted as the engine makes them."""
    calls, reduce = [0], engine.ds.allreduce_gradients

    def counted(*args, **kwargs):
        calls[0] += 1
        return reduce(*args, **kwargs)

    engine.ds.allreduce_gradients = counted
    return calls


def _vetoed_step(engine, batches):
    """The loss-spike veto: a step over the last batches with a ceiling below any loss must drop
    its update on every rank (local weights, ZeRO-3 partitions included, bitwise unchanged; EMA and
    LR held) and still report the true loss: the same batches again, without a ceiling, give the
    same loss from the same weights, and that step's update stands."""
    import torch
    import torch.distributed as dist

    def local():
        return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]

    before, lr = local(), engine.current_lr()
    ema = [s.clone() for s in engine.ema.shadow]
    result = engine.train_step(batches, loss_ceiling=0.0)
    kept = all(torch.equal(a, b) for a, b in zip(before, local()))
    kept &= all(torch.equal(a, b) for a, b in zip(ema, engine.ema.shadow))
    lr_held = engine.current_lr() == lr
    again = engine.train_step(batches)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (result.spike, result.skipped, kept, result.grad_norm is None))
    return {"flags": flags, "lr_held": lr_held, "loss": result.loss, "again": again.loss,
            "again_applied": not again.skipped and not again.spike}


def _validation_sums(engine, batches, st, use_ema=True):
    """[Σ ELBO, Σ tokens] of the engine's per-row evaluation sums over every DP replica."""
    import torch
    import torch.distributed as dist

    rows = engine.evaluate(batches, use_ema=use_ema)
    sums = torch.tensor([float(rows[:, 0].sum()), float(sum(b.tokens for b in batches))], dtype=torch.float64)
    if st.dp > 1:
        dist.all_reduce(sums, group=st.dp_group)
    return sums.tolist()


def _dense_validation(engine, batches, cfg):
    """The validation sum recomputed outside the engine: the EMA weights applied by hand to the
    plain model, dense logits, prime_scale.prime's sub-token ELBO."""
    import torch

    from prime_scale import prime

    model = engine.module.model
    params = list(engine.module.parameters())
    saved = [p.detach().clone() for p in params]
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for p, avg in zip(params, engine.ema.shadow):
            p.copy_(avg)
        model.eval()
        for b in batches:
            nll, _ = prime.prime_loss(model(b.yt), b.x0, b.yt, b.t, None, V, cfg.model.ell, "prime_elbo")
            total += float(nll.sum())
            tokens += nll.numel()
        for p, s in zip(params, saved):
            p.copy_(s)
    return [total, tokens]


def _wrong_topology_is_refused(st):
    """A topology that reads the two pipeline ranks as tensor-parallel peers must be refused."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from prime_scale.errors import UserError
    from prime_scale.parallel.state import check_layouts

    try:
        check_layouts(PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=1), st.rank)
    except UserError as e:
        return str(e)
    return None


REFERENCES = [["parallel.zero_stage=0"], ["parallel.zero_stage=1"], ["parallel.zero_stage=2"], ["parallel.zero_stage=3"]]
TWO_RANKS = [["parallel.tp=2"], ["parallel.pp=2"], ["parallel.zero_stage=1"], ["parallel.zero_stage=2"],
             ["parallel.zero_stage=3"], ["parallel.pp=2", "precision=bf16"]]


@pytest.fixture(scope="module")
def runs():
    ref = launch(1, "test_parallel_layouts:run_layouts", {"layouts": REFERENCES}, timeout=300)[0]
    two = launch(2, "test_parallel_layouts:run_layouts", {"layouts": TWO_RANKS}, timeout=420)[0]
    return {tuple(r["layout"]): r for r in ref}, {tuple(r["layout"]): r for r in two}


@pytest.fixture(scope="module")
def four_ranks():
    layouts = [["parallel.tp=2", "parallel.zero_stage=1"]]
    return launch(4, "test_parallel_layouts:run_layouts", {"layouts": layouts}, timeout=300)[0][0]


def _same_training(a, b, tol=1e-5):
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        assert abs(x - y) < tol, f"step {step}: loss {x} vs {y} ({a['layout']} vs {b['layout']})"
    for step, (x, y) in enumerate(zip(a["norms"], b["norms"])):
        assert abs(x - y) < 1e-4 * max(1.0, abs(x)), f"step {step}: grad norm {x} vs {y}"
    assert abs(a["val"][1] - b["val"][1]) < 0.5, "validation token counts differ"
    assert abs(a["val"][0] / a["val"][1] - b["val"][0] / b["val"][1]) < tol, (a["val"], b["val"])


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name][:2], b[name][:2]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), name
        assert a[name][2] == pytest.approx(b[name][2], abs=1e-7), name


def test_validation_is_the_dense_subtoken_elbo_of_the_ema_weights(runs):
    ref, _ = runs
    r = ref[("parallel.zero_stage=1",)]
    assert r["weights_restored"]
    assert r["val"][1] == r["independent_val"][1]
    assert abs(r["val"][0] - r["independent_val"][0]) < 1e-6 * r["val"][0]
    # and the EMA weights are not the training weights (decay 0.5 over 4 steps)
    assert abs(r["val"][0] - r["val_raw"][0]) > 1e-3


def test_references_agree_across_zero_stages(runs):
    ref, _ = runs
    for stage in (0, 2, 3):
        _same_training(ref[("parallel.zero_stage=1",)], ref[(f"parallel.zero_stage={stage}",)])
    losses = ref[("parallel.zero_stage=1",)]["losses"]
    assert len(set(round(x, 6) for x in losses)) == len(losses)  # four different batches, not a constant


@pytest.mark.parametrize("layout", [("parallel.tp=2",), ("parallel.pp=2",)])
def test_tp2_and_pp2_match_one_process(runs, layout):
    ref, two = runs
    r, base = two[layout], ref[("parallel.zero_stage=1",)]
    assert r["dp"] == 1 and r["gas"] == 4
    # one data-parallel rank (fp32: ZeRO 0) has nothing to average: DeepSpeed's one-rank
    # "all-reduce" (a flat copy of every gradient and back) is skipped in both engines
    assert r["zero_run"] == 0 and r["reductions"] == 0, r["reductions"]
    _same_weights(base["weights"], r["weights"])
    _same_training(base, r)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_matches_dp1_under_each_zero_stage(runs, stage):
    ref, two = runs
    key = (f"parallel.zero_stage={stage}",)
    r = two[key]
    assert r["dp"] == 2 and r["gas"] == 2  # same global batch: half the accumulation steps
    assert r["reductions"] > 0  # the counter sees the reductions that must run
    if stage < 3:
        _same_weights(ref[key]["weights"], r["weights"])
    _same_training(ref[key], r)


def test_tp2_dp2_zero1_partitions_and_matches_one_process(runs, four_ranks):
    ref, _ = runs
    r, base = four_ranks, ref[("parallel.zero_stage=1",)]
    assert (r["tp"], r["dp"], r["gas"]) == (2, 2, 2)
    # a real ZeRO-1 partition of the fp32 optimizer state over the two DP ranks, not stage 0
    assert r["zero_run"] == 1 and r["optimizer"] == "DeepSpeedZeroOptimizer", r
    _same_weights(base["weights"], r["weights"])
    _same_training(base, r)
    v = r["vetoed"]
    assert all(list(f) == [True, True, True, True] for f in v["flags"]) and v["loss"] == v["again"], v


def test_pp2_bf16_stays_close_to_fp32(runs):
    ref, two = runs
    r, base = two[("parallel.pp=2", "precision=bf16")], ref[("parallel.zero_stage=1",)]
    for x, y in zip(base["losses"], r["losses"]):
        assert abs(x - y) < 5e-3 * abs(x), (base["losses"], r["losses"])


def test_a_loss_spike_veto_drops_the_update_under_every_layout(runs):
    ref, two = runs
    for r in [*ref.values(), *two.values()]:
        v = r["vetoed"]
        assert all(list(f) == [True, True, True, True] for f in v["flags"]), (r["layout"], v["flags"])
        assert v["lr_held"] and v["again_applied"], r["layout"]
        assert v["loss"] == v["again"], (r["layout"], v)  # the true loss, from unchanged weights


def test_a_topology_that_disagrees_with_megatron_is_refused(runs):
    _, two = runs
    message = two[("parallel.pp=2",)]["refused"]
    assert message and "disagree" in message and "refusing" in message
