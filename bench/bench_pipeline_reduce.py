"""The pipeline engine's gradient all-reduce over one data-parallel rank (issue 24, item 15).

pp = 2, fp32 (ZeRO 0), DP = 1, two gloo processes: DeepSpeed's `_exec_reduce_grads` flattens every
gradient of the stage, "all-reduces" it over the one rank and copies it back. The engine now turns
`pipeline_enable_backward_allreduce` off there; this times the call itself (by calling it with the
flag back on) and whole steps with the flag on and off, alternating. docs/benchmarks.md has the table.

    python bench/bench_pipeline_reduce.py [--vocab 50257] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the process harness of the tests: N ranks with launcher variables


def bench(rounds: int = 6, vocab: int = 8000, seq_len: int = 128, hidden: int = 256, layers: int = 4) -> dict:
    import torch
    import torch.distributed as dist

    from harness.dist import port
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.noise import make_batch
    from prime_scale.parallel import state as pstate

    V, L = vocab, seq_len
    cfg = load_recipe("tiny-cpu", [f"model.vocab_size={V}", f"model.layers={layers}", f"model.hidden={hidden}",
                                   "model.heads=4", f"model.seq_len={L}", "model.ell=2", "train.global_batch=8",
                                   "train.micro_batch=2", "parallel.pp=2", "optim.ema=0", "optim.warmup_steps=0",
                                   "train.steps=1000", "model.dropout=0"])
    st = pstate.init(cfg, environ=port(0), timeout_s=120)
    engine = Engine(cfg, st, V)
    reduce_s, real = [], engine.ds.allreduce_gradients

    def timed(*args, **kwargs):
        t = time.perf_counter()
        real(*args, **kwargs)
        reduce_s.append(time.perf_counter() - t)

    engine.ds.allreduce_gradients = timed
    data = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(0))

    def step(k: int) -> float:
        batches = []
        for j in range(engine.gas):
            index = torch.arange(j * 2, j * 2 + 2) + 8 * k
            batches.append(make_batch(data[index % 64], index, index, seed=0, step=k, global_batch=8,
                                      vocab_size=V, ell=2))
        dist.barrier()
        t = time.perf_counter()
        engine.train_step(batches)
        return time.perf_counter() - t

    step(0)  # warm-up
    steps = {True: [], False: []}
    for r in range(rounds):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            engine.ds.pipeline_enable_backward_allreduce = flag
            steps[flag].append(step(1 + 2 * r + flag))
    out = {"rank": st.rank, "stage_params": sum(p.numel() for p in engine.module.parameters()),
           "reduce_s": statistics.median(reduce_s), "step_with_reduce_s": statistics.median(steps[True]),
           "step_without_s": statistics.median(steps[False])}
    pstate.destroy()
    return out


def main() -> None:
    from harness.dist import launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    ranks = launch(2, "bench_pipeline_reduce:bench", {"rounds": a.rounds, "vocab": a.vocab}, timeout=900,
                   extra_env={"PYTHONPATH": str(REPO / "bench")})
    print(json.dumps(ranks, indent=1))


if __name__ == "__main__":
    main()
