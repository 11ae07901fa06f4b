"""Training-engine benchmark: throughput, CPU MFU, Prime overhead, engine overhead, ZeRO memory.

    python bench/bench_train.py                 # all measurements (a few minutes on 2 cores)
    python bench/bench_train.py --steps 10      # fewer timed steps

Measured on the tiny-cpu recipe's model (synthetic token ids, real Prime noise, real engines). The
machine is shared, so whatever is compared is timed in the same process, step for step in turn
(A, B, A, B, ...), and reported as the median of the per-round ratios:
- tokens/s of a training step (DeepSpeed engine, the recipe's ZeRO 1, fp32) and "CPU MFU": model
  FLOP/s (prime_scale.model.train_flops_per_token: matmuls of blocks and head, attention's L×L
  products, forward + backward) over the dense fp32 matmul FLOP/s measured by a GEMM burst just
  before each step, same process and threads. bf16 is timed only on a CPU with native bf16;
- Prime overhead: step time at ℓ = 4 over ℓ = 1, same backbone (D divisible by both);
- engine overhead: the DeepSpeed engine's step time over a plain PyTorch loop (same model, loss,
  torch AdamW, torch clip_grad_norm_, LR schedule) on the same batches, at ZeRO 0 and ZeRO 1;
- peak memory per rank for ZeRO 0–3 with DP = 2 (two processes started by torchrun): the
  process's peak RSS and its growth from just before the engine is built (model states plus
  activations), next to the model-state bytes ZeRO's partitioning predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VOCAB = 4096  # the demo corpus' tokenizer size


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cfg(overrides):
    from prime_scale.config import load_recipe

    return load_recipe("tiny-cpu", [f"model.vocab_size={VOCAB}", "optim.warmup_steps=0", *overrides])


def _batches(cfg, step, dp_rank=0, dp=1, gas=1):
    import torch

    from prime_scale.noise import make_batch

    G, mb, L = cfg.train.global_batch, cfg.train.micro_batch, cfg.model.seq_len
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (G, L), generator=gen)
    out = []
    for j in range(gas):
        first = (j * dp + dp_rank) * mb
        index = torch.arange(first, first + mb) + step * G
        out.append(make_batch(data[first:first + mb], index, index, seed=cfg.seed, step=step, global_batch=G,
                              vocab_size=VOCAB, ell=cfg.model.ell))
    return out


class Clock:
    """Wall time and this process's CPU time (all threads). On a shared machine other jobs stretch
    the wall time of compute-bound work but hardly its CPU time: CPU-time figures, divided by the
    thread count, are what the run would take with the cores to itself."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_flops(dtype, seconds: float = 0.3, n: int = 1024) -> tuple[float, float]:
    """Dense square GEMM rate (FLOP/s) over a short burst: per wall second, per CPU second."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    reps, clock = 0, Clock()
    while time.perf_counter() - clock.wall < seconds:
        a @ b
        reps += 1
    wall, cpu = clock.stop()
    return 2 * n**3 * reps / wall, 2 * n**3 * reps / cpu


class EngineRunner:
    """A DeepSpeed engine for a recipe variant; step(i) trains on synthetic batch i."""

    def __init__(self, overrides):
        from prime_scale.engine import Engine
        from prime_scale.parallel import state as pstate

        self.cfg = _cfg(overrides)
        self.engine = Engine(self.cfg, pstate.get_state(), VOCAB)
        self.args = self.engine.args

    def step(self, i: int) -> tuple[float, float]:
        batches = _batches(self.cfg, i, gas=self.engine.gas)
        clock = Clock()
        self.engine.train_step(batches)
        return clock.stop()


class PlainRunner:
    """The same model, loss and batches in a plain PyTorch loop: torch AdamW, clip_grad_norm_,
    the same LR schedule. No DeepSpeed."""

    def __init__(self, overrides):
        import torch

        from prime_scale.optim import lr_factor, parameter_groups
        from prime_scale.model import ModelArgs, PrimeObjective, PrimeTransformer

        self.cfg = cfg = _cfg(overrides)
        self.model = PrimeTransformer(ModelArgs.from_config(cfg, VOCAB))
        self.objective = PrimeObjective(VOCAB, cfg.model.ell, cfg.model.objective, cfg.model.carry_over)
        o = cfg.optim
        self.opt = torch.optim.AdamW(parameter_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))

    def step(self, i: int) -> tuple[float, float]:
        import torch

        batches = _batches(self.cfg, i)
        clock = Clock()
        for b in batches:
            _, mean = self.objective.nll(self.model(b.yt), b.x0, b.yt, b.t, b.mask)
            (mean / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return clock.stop()


def interleaved(runners: dict, steps: int, warmup: int = 3, matmul_dtype=None) -> dict:
    """Step every runner in turn, `steps` rounds after warm-up, so load changes on a shared
    machine hit all of them alike; with matmul_dtype, a GEMM burst before each round.
    times[name] / rates: lists of (per wall second, per CPU second) pairs."""
    times = {name: [] for name in runners}
    rates = []
    for i in range(warmup + steps):
        if matmul_dtype is not None and i >= warmup:
            rates.append(matmul_flops(matmul_dtype))
        for name, runner in runners.items():
            dt = runner.step(i)
            if i >= warmup:
                times[name].append(dt)
    return {"times": times, "rates": rates}


def _wall(pairs):
    return [p[0] for p in pairs]


def _cpu(pairs):
    return [p[1] for p in pairs]


def _median_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


# --------------------------------------------------------------------------- memory (2 ranks)


def memory_worker(stage: int, steps: int, out: str) -> None:
    import torch

    from prime_scale.engine import Engine
    from prime_scale.parallel import state as pstate

    cfg = _cfg([f"parallel.zero_stage={stage}", "train.micro_batch=2", "optim.ema=0"])
    st = pstate.init(cfg)
    before = _rss_mb()
    engine = Engine(cfg, st, VOCAB)
    for step in range(steps):
        engine.train_step(_batches(cfg, step, st.dp_rank, st.dp, engine.gas))
    peak = _rss_mb()
    params = list(engine.module.parameters())
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    # what this rank holds, read from the engine: its weights (ZeRO-3: its partition) and the
    # torch optimizer's state (ZeRO ≥ 1: the moments of its partition only)
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * 4 for p in params)
    basic = getattr(engine.ds.optimizer, "optimizer", engine.ds.optimizer)
    moments = sum(t.numel() * t.element_size() for s in basic.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    Path(out + f".{st.rank}").write_text(json.dumps({"rank": st.rank, "before_mb": before, "peak_mb": peak,
                                                      "params": n_params, "weights_mb": held / 2**20,
                                                      "moments_mb": moments / 2**20}))
    pstate.destroy()


def model_state_mb(params: int, stage: int, dp: int) -> float:
    """fp32 training with AdamW, as ZeRO's partitioning predicts it: 4 bytes of weights, 4 of
    gradients, 8 of moments per parameter; ZeRO ≥ 1 splits the moments and keeps the optimizer's
    fp32 copy of its partition, ZeRO-2 also splits the gradients, ZeRO-3 also the weights."""
    w, g, m = 4.0 * params, 4.0 * params, 8.0 * params
    if stage >= 1:
        m = m / dp + w / dp  # moments and the optimizer's fp32 copy of its partition
    if stage >= 2:
        g = g / dp
    if stage >= 3:
        w = w / dp
    return (w + g + m) / 2**20


def measure_memory(steps: int) -> list[dict]:
    rows = []
    for stage in (0, 1, 2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "mem")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            __file__, "--memory-worker", str(stage), "--steps", str(steps), "--out", out],
                           check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
        rows.append({"stage": stage, "peak_mb": max(r["peak_mb"] for r in ranks),
                     "growth_mb": max(r["peak_mb"] - r["before_mb"] for r in ranks),
                     "predicted_mb": model_state_mb(ranks[0]["params"], stage, 2),
                     "weights_mb": max(r["weights_mb"] for r in ranks), "moments_mb": max(r["moments_mb"] for r in ranks)})
    return rows


# --------------------------------------------------------------------------- main


def _throughput(label, runner, flops, tokens, steps, dtype) -> dict:
    """Step time, tokens/s and MFU of `runner`; by wall time, and by CPU time / threads (the step
    time with the cores to itself). MFU is per step against the GEMM burst just before it."""
    run = interleaved({"engine": runner}, steps, matmul_dtype=dtype)
    times, rates = run["times"]["engine"], run["rates"]
    out = {"dtype": label}
    for kind, pick, scale in (("wall", _wall, 1), ("cpu", _cpu, _threads())):
        step = statistics.median(pick(times)) / scale
        out[kind] = {"step_s": step, "tokens_per_s": tokens / step, "model_gflops": flops / step / 1e9,
                     "matmul_gflops": statistics.median(pick(rates)) * scale / 1e9,
                     "mfu": statistics.median(flops / t / r for t, r in zip(pick(times), pick(rates)))}
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _compare(a, b) -> dict:
    """Median per-round ratio a / b, by wall time and by CPU time."""
    return {"a_step_s": statistics.median(_wall(a)), "b_step_s": statistics.median(_wall(b)),
            "ratio_wall": statistics.median(x / y for x, y in zip(_wall(a), _wall(b))),
            "ratio_cpu": statistics.median(x / y for x, y in zip(_cpu(a), _cpu(b)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, max(3, args.steps // 3), args.out)
        return
    import torch

    from prime_scale.model import train_flops_per_token
    from prime_scale.parallel import state as pstate

    threads = int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0))))
    torch.set_num_threads(threads)
    results = {"threads": threads, "torch": torch.__version__, "steps": args.steps}
    pstate.init(_cfg([]))
    try:
        # throughput and MFU, fp32 (the tiny-cpu recipe's precision)
        recipe = EngineRunner([])
        tokens = recipe.cfg.train.global_batch * recipe.cfg.model.seq_len
        flops = train_flops_per_token(recipe.args) * tokens
        results["throughput"] = [_throughput("fp32", recipe, flops, tokens, args.steps, torch.float32)]
        bf16_rate, fp32_rate = matmul_flops(torch.bfloat16, 1.0)[1], matmul_flops(torch.float32, 1.0)[1]
        results["bf16_matmul_gflops"], results["fp32_matmul_gflops"] = bf16_rate / 1e9, fp32_rate / 1e9
        if bf16_rate > fp32_rate:  # a CPU with native bf16 (AVX-512 BF16 / AMX)
            results["throughput"].append(_throughput("bf16", EngineRunner(["precision=bf16"]), flops, tokens,
                                                     args.steps, torch.bfloat16))
        del recipe
        # Prime overhead: the same backbone at ℓ = 4 and ℓ = 1
        t = interleaved({"ell1": EngineRunner(["model.ell=1"]), "ell4": EngineRunner(["model.ell=4"])},
                        args.steps)["times"]
        results["prime_overhead"] = _compare(t["ell4"], t["ell1"])
        # engine overhead: DeepSpeed engine vs a plain loop, ZeRO 0 and the recipe's ZeRO 1
        overhead = {}
        for stage in (0, 1):
            ov = [f"parallel.zero_stage={stage}", "optim.ema=0"]
            t = interleaved({"engine": EngineRunner(ov), "plain": PlainRunner(ov)}, args.steps)["times"]
            overhead[stage] = _compare(t["engine"], t["plain"])
        results["engine_overhead"] = overhead
    finally:
        pstate.destroy()
    results["memory"] = measure_memory(args.steps)
    print(json.dumps(results, indent=1))
    _markdown(results)


def _markdown(r: dict) -> None:
    print(f"\n{r['threads']} thread(s), torch {r['torch']}, medians of {r['steps']} interleaved steps\n")
    print("| dtype | clock | step (s) | tokens/s | model GFLOP/s | dense matmul GFLOP/s | CPU MFU |")
    print("|---|---|---|---|---|---|---|")
    for x in r["throughput"]:
        for kind in ("wall", "cpu"):
            y = x[kind]
            print(f"| {x['dtype']} | {kind} | {y['step_s']:.3f} | {y['tokens_per_s']:,.0f} | {y['model_gflops']:.1f} | "
                  f"{y['matmul_gflops']:.1f} | {100 * y['mfu']:.0f}% |")
    if len(r["throughput"]) == 1:
        print(f"\nbf16 not timed: this CPU has no native bf16 (dense matmul per core: bf16 "
              f"{r['bf16_matmul_gflops']:.1f} GFLOP/s, fp32 {r['fp32_matmul_gflops']:.1f} GFLOP/s)")
    p = r["prime_overhead"]
    print(f"\nPrime overhead ℓ=4 / ℓ=1: {p['ratio_wall']:.3f}× (wall), {p['ratio_cpu']:.3f}× (CPU); "
          f"steps {p['a_step_s']:.3f} s / {p['b_step_s']:.3f} s")
    for stage, o in r["engine_overhead"].items():
        print(f"Engine overhead ZeRO {stage}, engine / plain loop: {o['ratio_wall']:.3f}× (wall), "
              f"{o['ratio_cpu']:.3f}× (CPU); steps {o['a_step_s']:.3f} s / {o['b_step_s']:.3f} s")
    print("\n| ZeRO stage (DP = 2) | peak RSS per rank (MB) | growth from engine build (MB) | "
          "weights held (MB) | Adam moments held (MB) | model states ≈ (MB) |")
    print("|---|---|---|---|---|---|")
    for m in r["memory"]:
        print(f"| {m['stage']} | {m['peak_mb']:.0f} | {m['growth_mb']:.0f} | {m['weights_mb']:.1f} | "
              f"{m['moments_mb']:.1f} | {m['predicted_mb']:.0f} |")


if __name__ == "__main__":
    main()
