"""The planner (prime-scale plan) against independent computations.

- Parameter counts: the plan's per-stage counts summed over TP equal the model's own
  count_parameters (plus TP padding), and `--verify` builds chosen ranks of every shipped recipe's
  full topology (prime-7b: all 64-rank corners) on the meta device under a fake process group and
  finds exactly the plan's count; a plan that is off by one parameter is caught.
- Memory: model-state bytes predicted vs the bytes a real DeepSpeed engine holds (every live
  tensor's storage, counted once) between steps and at the optimizer step, ZeRO 0–3 at DP = 2,
  TP = 2 and PP = 2, within 10%; activation bytes predicted vs the bytes autograd saves for
  backward (saved_tensors_hooks), within 10%.
- The command: the table and verdict, --json, the fixes for a plan that does not fit, bad input.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.dist import launch

REPO = Path(__file__).resolve().parent.parent
# every shipped recipe at the GPU counts it is meant for
SHIPPED = [("prime-7b", 64), ("prime-1b", 8), ("prime-1b", 64), ("owt-base", 8), ("owt-mdlm", 8), ("owt-prime-l2", 8),
           ("owt-prime-l4", 8), ("owt-prime-l6", 8), ("tiny-cpu", 1)]


def test_every_shipped_recipe_is_planned_here():
    assert {name for name, _ in SHIPPED} == {p.stem for p in (REPO / "recipes").glob("*.yaml")}


def _plan(recipe, gpus, overrides=(), gpu="h100-80gb", vocab=4096):
    from prime_scale.config import load_recipe
    from prime_scale.planner.gpus import gpu_kind
    from prime_scale.planner.plan import make_plan

    cfg = load_recipe(recipe, list(overrides))
    return cfg, make_plan(cfg, gpus, gpu_kind(gpu), vocab=None if cfg.model.vocab_size else vocab)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("recipe,gpus", SHIPPED)
def test_stage_counts_add_up_to_the_models_own_count(recipe, gpus):
    from prime_scale.model import ModelArgs, count_parameters
    from prime_scale.model.transformer import padded

    cfg, plan = _plan(recipe, gpus)
    V, tp = plan["recipe"]["vocab_size"], plan["recipe"]["tp"]
    own = count_parameters(ModelArgs.from_config(cfg, V))["total"]
    assert plan["parameters"]["total"] == own
    pad = (padded(V, tp) - V) * cfg.model.hidden
    if cfg.model.ell == 1:
        rows = ModelArgs.from_config(cfg, V).base + 1
        pad += (padded(rows, tp) - rows) * cfg.model.hidden
    assert plan["parameters"]["as_trained"] == own + pad
    assert sum(s["blocks"] for s in plan["stages"]) == cfg.model.layers


@pytest.mark.parametrize("recipe,gpus", [("prime-7b", 64), ("tiny-cpu", 1)])
def test_the_reshard_reads_sixteen_bytes_per_parameter_of_each_stage(recipe, gpus):
    # fp32 master, two Adam moments and the EMA of every full tensor of the stage (resume after a layout change)
    cfg, plan = _plan(recipe, gpus, ["optim.ema=0.99"])
    assert sum(s["reshard_read_bytes"] for s in plan["stages"]) == 16 * plan["parameters"]["as_trained"]
    _, no_ema = _plan(recipe, gpus, ["optim.ema=0"])
    assert sum(s["reshard_read_bytes"] for s in no_ema["stages"]) == 12 * plan["parameters"]["as_trained"]
    assert plan["layout_change"]["reshardable"]
    _, zero3 = _plan("tiny-cpu", 1, ["parallel.zero_stage=3"])
    assert not zero3["layout_change"]["reshardable"] and "ZeRO 3" in zero3["layout_change"]["why"]
    _, bf16 = _plan("tiny-cpu", 1, ["precision=bf16"])
    assert bf16["layout_change"]["reshardable"] and not bf16["layout_change"]["exact"]


@pytest.mark.parametrize("recipe,gpus", SHIPPED)
def test_verify_builds_the_ranks_of_every_shipped_recipe_and_finds_the_planned_counts(recipe, gpus):
    from prime_scale.planner.dryrun import verify

    cfg, plan = _plan(recipe, gpus)
    result = verify(cfg, gpus, plan)
    assert result["ok"] and result["topology_ok"], result["problems"]
    r = plan["recipe"]
    stages = {x["stage"] for x in result["ranks"]}
    assert stages == set(range(r["pp"]))  # first and last stage (both, for prime-7b)
    assert {x["tp_rank"] for x in result["ranks"]} == ({0, r["tp"] - 1})
    assert all(x["parameters"] == plan["stages"][x["stage"]]["total"] for x in result["ranks"])
    if recipe == "prime-7b":
        assert max(x["rank"] for x in result["ranks"]) == 63 and r["dp"] == 8


def test_a_plan_off_by_one_parameter_is_caught():
    import copy

    from prime_scale.planner.dryrun import verify

    cfg, plan = _plan("prime-7b", 64)
    wrong = copy.deepcopy(plan)
    wrong["stages"][1]["total"] += 1
    result = verify(cfg, 64, wrong, ranks=[63])
    assert not result["ok"]
    assert any("rank 63 (stage 1, tp rank 3): built" in p and "the plan says" in p for p in result["problems"])


def test_a_data_manifest_that_disagrees_with_the_model_fails_verify(tmp_path):
    from prime_scale.planner.dryrun import verify

    data = tmp_path / "owt"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"seq_len": 1024, "vocab_size": 50257}))
    cfg, plan = _plan("prime-1b", 8, [f"data.path={data}"])
    result = verify(cfg, 8, plan, ranks=[0])
    assert not result["ok"]
    assert any("sequences of 1024 tokens, the model is built for 2048: they disagree" in p for p in result["problems"])


# --------------------------------------------------------------------------- memory against real engines

V, L = 2000, 32
SMALL = [f"model.vocab_size={V}", "model.layers=4", "model.hidden=256", "model.heads=4", f"model.seq_len={L}",
         "model.ell=2", "train.global_batch=8", "train.micro_batch=2", "optim.ema=0", "model.dropout=0.0"]


def held_bytes() -> int:
    """Every live tensor's storage, each counted once: what the process holds in tensors. A
    parameter's .grad is not an object the garbage collector lists, so it is counted through its
    parameter (gradients that nothing else references: ZeRO 0 over one DP rank, no flat buffer)."""
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        for tensor in (obj, obj.grad if isinstance(obj, torch.nn.Parameter) else None):
            if tensor is None or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def measure_model_state(layouts: list) -> list:
    """Per layout, on every rank: the tensor bytes the engine adds, after two steps (between steps)
    and when the second optimizer step starts (gradients reduced and present; the optimizer's
    moments, which torch's AdamW creates in its first step, exist)."""
    import torch
    import torch.distributed as dist

    from harness.dist import port
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.noise import make_batch
    from prime_scale.parallel import state as pstate

    data = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(0))
    out = []
    for k, overrides in enumerate(layouts):
        cfg = load_recipe("tiny-cpu", SMALL + overrides)
        st = pstate.init(cfg, environ=port(k), timeout_s=120)
        batches, at_step = [], {}
        base = held_bytes()
        engine = Engine(cfg, st, V)
        step = engine.ds.optimizer.step

        def measured_step(*a, **kw):
            at_step["bytes"] = held_bytes() - base  # the second step's: the optimizer state exists by then
            return step(*a, **kw)

        engine.ds.optimizer.step = measured_step
        G, mb = cfg.train.global_batch, cfg.train.micro_batch
        for j in range(engine.gas):
            first = (j * st.dp + st.dp_rank) * mb
            index = torch.arange(first, first + mb)
            batches.append(make_batch(data[index], index, index, seed=0, step=0, global_batch=G, vocab_size=V,
                                      ell=cfg.model.ell))
        engine.train_step(batches)
        engine.train_step(batches)
        del batches
        between = held_bytes() - base
        out.append({"layout": overrides, "rank": st.rank, "between_steps": between, "at_step": at_step["bytes"]})
        del engine
        dist.barrier()
        pstate.destroy()
    return out


STATE_LAYOUTS = [["parallel.zero_stage=0"], ["parallel.zero_stage=1"], ["parallel.zero_stage=2"],
                 ["parallel.zero_stage=3"], ["parallel.zero_stage=1", "precision=bf16"],
                 ["parallel.tp=2"], ["parallel.pp=2"]]


@pytest.fixture(scope="module")
def held():
    # one job per layout: an engine leaves tensors behind in library globals until the next one
    # replaces them, which would blur the next layout's baseline
    out = []
    for layout in STATE_LAYOUTS:
        for per_rank in launch(2, "test_planner:measure_model_state", {"layouts": [layout]}, timeout=300):
            out += per_rank
    return out


@pytest.mark.parametrize("layout", STATE_LAYOUTS, ids=lambda x: ",".join(x))
def test_model_state_bytes_are_predicted_within_ten_percent(held, layout):
    from prime_scale.planner import memory

    _, plan = _plan("tiny-cpu", 2, SMALL + layout)
    for r in (x for x in held if x["layout"] == layout):
        stage = plan["stages"][0 if len(plan["stages"]) == 1 else r["rank"] // (2 // len(plan["stages"]))]
        state = stage["model_state"]
        for when in ("between_steps", "at_step"):
            predicted = state[when]
            assert abs(r[when] - predicted) <= 0.10 * predicted, (layout, r["rank"], when, r[when], predicted,
                                                                  state)
    assert memory.model_state(10, 2, 3, "fp32")["buckets"] > 0


# --------------------------------------------------------------------------- activations against autograd


def _saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves for backward during fn(), each storage once, parameters not counted."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def activation_bytes(recompute: str, ell: int) -> tuple[int, float]:
    """(saved by autograd, predicted) bytes of one training forward of a 4-block model and its loss."""
    import torch

    from prime_scale.config import load_recipe
    from prime_scale.model import ModelArgs, PrimeObjective, PrimeTransformer
    from prime_scale.noise import make_batch
    from prime_scale.parallel import state as pstate
    from prime_scale.planner import memory
    from prime_scale.planner.shapes import Dims, stage_parameters

    overrides = SMALL + [f"model.ell={ell}", "model.hidden=192", "model.heads=3", "train.micro_batch=4",
                         f"model.recompute={recompute}"]
    cfg = load_recipe("tiny-cpu", overrides)
    pstate.init(cfg)
    try:
        model = PrimeTransformer(ModelArgs.from_config(cfg, V))
        model.train()
        objective = PrimeObjective(V, ell, cfg.model.objective, cfg.model.carry_over)
        rows = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(1))
        batch = make_batch(rows, torch.arange(4), torch.arange(4), seed=0, step=0, global_batch=4, vocab_size=V,
                           ell=ell)
        saved, _ = _saved_bytes(lambda: objective.nll(model(batch.yt), batch.x0, batch.yt, batch.t, batch.mask)[1],
                                list(model.parameters()))
    finally:
        pstate.destroy()
    d = Dims.of(cfg, V)
    predicted = memory.stage_activations(d, stage_parameters(d)[0], 4 * L, 4, recompute, 0.0, 1)["saved"]
    return saved, predicted


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("ell", [1, 3])
def test_activation_bytes_are_predicted_within_ten_percent(recompute, ell):
    saved, predicted = activation_bytes(recompute, ell)
    assert abs(saved - predicted) <= 0.10 * predicted, (recompute, ell, saved, predicted)


# --------------------------------------------------------------------------- the command


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", "plan", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_the_plan_command_prints_the_table_json_and_fixes():
    out = _cli("prime-7b", "--gpus", "64", "--gpu", "h100-80gb")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TP 4 × PP 2 × DP 8" in out.stdout and "verdict: FITS" in out.stdout and "MFU" in out.stdout
    assert "assumption: matmuls reach" in out.stdout
    # a micro-batch far too large for a 40 GB GPU: the verdict and the single changes that fix it
    js = _cli("prime-7b", "train.micro_batch=16", "--gpus", "64", "--gpu", "a100-40gb", "--json")
    assert js.returncode == 0, js.stderr[-3000:]
    plan = json.loads(js.stdout)
    assert not plan["fits"] and plan["peak_bytes"] > plan["gpu"]["memory_bytes"]
    assert plan["fixes"] and all(f["peak_gib"] * 1024**3 <= plan["gpu"]["memory_bytes"] for f in plan["fixes"])
    bad = _cli("prime-7b", "--gpus", "60")
    assert bad.returncode == 2 and "world size 60 is not divisible by parallel.tp × parallel.pp" in bad.stderr, \
        bad.stderr[-2000:]
    unknown = _cli("prime-7b", "--gpus", "64", "--gpu", "h900")
    assert unknown.returncode == 2 and "unknown GPU kind" in unknown.stderr
