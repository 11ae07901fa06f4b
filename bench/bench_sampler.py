"""Sampling step time on issue 14's config A, this checkout against a baseline revision, in one run.

    python bench/bench_sampler.py [--baseline b1742bd] [--rounds 3] [--steps 128] [--threads 2]

Config A: 4 × 256, 4 heads, V = 8000, L = 256, batch 4, 128 steps, carry-over on, nucleus 1.0, a
randomly initialised model (the sampler's cost does not depend on what the model learned). For
ℓ = 1 and ℓ = 4 it times `ancestral_sample` with this checkout and with the baseline (checked out
into a temporary worktree), alternating, each in a fresh process, and reports the median time per
step, the share spent in the network (the backbone and, where it runs, the head), the network calls,
and the matrix-multiply peak of the machine measured in the same process (so the figures can be set
beside the issue's reference: 270 ms/step at ℓ = 1 and 328 ms/step at ℓ = 4 on a 169–189 GFLOP/s
machine). The baseline's sampler takes a plain logits_fn; this checkout's is given the model split
at its head (inference.LoadedModel does the same for `prime-scale sample`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MS = {1: 270.0, 4: 328.0}  # the official code on the machine, per step

TIMED = """
import json, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
from prime_scale.config import load_recipe
from prime_scale.parallel import state
from prime_scale.model import ModelArgs, PrimeTransformer
from prime_scale import sampling

V, L, B, ell, steps = 8000, 256, 4, {ell}, {steps}
cfg = load_recipe("tiny-cpu", ["model.layers=4", "model.hidden=256", "model.heads=4", f"model.seq_len={{L}}",
                               f"model.ell={{ell}}", f"model.vocab_size={{V}}", "model.dropout=0.0"])
state.init(cfg)
model = PrimeTransformer(ModelArgs.from_config(cfg, V)).eval()
spent = [0.0]

def timed(fn):
    def run(x):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(x)
        spent[0] += time.perf_counter() - t
        return out
    return run

if hasattr(model, "hidden"):  # this checkout: the head only where a draw happens
    class Split:
        states = staticmethod(timed(model.hidden))
        logits_at = staticmethod(timed(lambda s: model.head(s.unsqueeze(0))[0, :, :V].float()))
    predictor = Split()
else:  # the baseline: one logits_fn over every position
    predictor = timed(lambda yt: model(yt)[..., :V].float())

a = torch.randn(2048, 2048); a @ a
t = time.perf_counter(); [a @ a for _ in range(5)]; peak = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
sampling.ancestral_sample(predictor, B, L, V, ell, 4, generator=torch.Generator().manual_seed(1))  # warm-up
spent[0] = 0.0
t = time.perf_counter()
r = sampling.ancestral_sample(predictor, B, L, V, ell, steps, generator=torch.Generator().manual_seed(0))
wall = time.perf_counter() - t
print(json.dumps({{"wall_s": wall, "ms_per_step": 1000 * wall / steps, "network_share": spent[0] / wall,
                  "nfe": r.nfe, "matmul_gflops": peak}}))
"""


def _run(code: str, pythonpath: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=pythonpath)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="b1742bd", help="git revision to compare with (the sampler before)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            results: dict = {}
            for round_ in range(args.rounds):
                for ell in (1, 4):
                    for name, path in (("baseline", base), ("this", REPO)):
                        r = _run(TIMED.format(threads=args.threads, ell=ell, steps=args.steps), path)
                        results.setdefault((ell, name), []).append(r)
                        print(json.dumps({"round": round_, "ell": ell, "version": name, **r}), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    print(f"\n| ℓ | baseline {args.baseline} ms/step (network share) | this checkout ms/step (network share) | "
          "speed-up | reference ms/step | vs reference | NFE | matmul GFLOP/s |\n|---|---|---|---|---|---|---|---|")
    for ell in (1, 4):
        b, t = results[(ell, "baseline")], results[(ell, "this")]
        bm = statistics.median(r["ms_per_step"] for r in b)
        tm = statistics.median(r["ms_per_step"] for r in t)
        share = lambda rs: statistics.median(r["network_share"] for r in rs)  # noqa: E731
        peak = statistics.median(r["matmul_gflops"] for r in b + t)
        print(f"| {ell} | {bm:.1f} ({share(b):.0%}) | {tm:.1f} ({share(t):.0%}) | {bm / tm:.2f}× | "
              f"{REFERENCE_MS[ell]:.0f} | {REFERENCE_MS[ell] / tm:.2f}× | {b[0]['nfe']} → {t[0]['nfe']} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
