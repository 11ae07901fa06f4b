"""Evaluation throughput of two versions of prime-scale, measured in one run on the demo val split.

Trains the tiny-cpu recipe for a few steps with THIS checkout, converts the checkpoint, then times
`evaluate_checkpoint` over the demo's validation split alternately with this checkout and with
another git revision (checked out into a temporary worktree), each in a fresh process with one
thread, several rounds; it reports each version's median tokens/s (wall and process CPU time) and
the ratio. Both evaluate the same sequences: the whole batches of the split (a revision from before
the padded-batch fix cannot evaluate the last, padded one).

    python bench/bench_eval.py --baseline 3892029 [--rounds 3] [--mc-samples 1] [--work DIR]
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

TIMED = """
import json, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from prime_scale.inference import evaluate_checkpoint
kwargs = dict(data={data!r}, batch_size=8, max_batches={batches}, mc_samples={mc})
evaluate_checkpoint({ckpt!r}, **{{**kwargs, "max_batches": 1}})  # warm-up: imports, first allocation
wall, cpu = time.perf_counter(), time.process_time()
r = evaluate_checkpoint({ckpt!r}, **kwargs)
print(json.dumps({{"tokens": r.tokens, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "nll_per_token": r.nll_per_token}}))
"""


def _run(code: str, pythonpath: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(pythonpath)},
                          capture_output=True, text=True, cwd=pythonpath)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare(work: Path, env: dict) -> tuple[Path, Path, int]:
    """A trained, consolidated tiny-cpu checkpoint; the demo dataset; its whole val batches of 8."""
    run = work / "run"
    subprocess.run([sys.executable, "-m", "prime_scale.cli", "train", "tiny-cpu", "train.steps=5", "eval.every=0",
                    "checkpoint.every=5", f"run.dir={run}", "--samples", "0"], env=env, check=True,
                   capture_output=True, cwd=work)
    out = work / "consolidated"
    subprocess.run([sys.executable, "-m", "prime_scale.cli", "convert", str(run), "--out", str(out)], env=env,
                   check=True, capture_output=True, cwd=work)
    from prime_scale.data.demo import demo_dataset

    data = demo_dataset(128)
    sequences = json.loads((data / "manifest.json").read_text())["splits"]["val"]["sequences"]
    return out, data, sequences // 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against (e.g. a commit id)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mc-samples", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    old = work / "baseline"
    if not old.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.baseline], check=True,
                       capture_output=True)
    ckpt, data, batches = _prepare(work, {**env, "PYTHONPATH": str(REPO)})
    code = TIMED.format(data=str(data), batches=batches, mc=args.mc_samples, ckpt=str(ckpt))
    results: dict = {"baseline": [], "this": []}
    for r in range(args.rounds):
        for name, path in (("baseline", old), ("this", REPO)):
            out = _run(code, path, env)
            results[name].append(out)
            print(f"round {r + 1} {name}: {out['tokens'] / out['wall_s']:,.0f} tokens/s wall, "
                  f"{out['tokens'] / out['cpu_s']:,.0f} tokens/s CPU, bound {out['nll_per_token']:.4f}", flush=True)
    med = {name: {k: statistics.median(o["tokens"] / o[k] for o in rows) for k in ("wall_s", "cpu_s")}
           for name, rows in results.items()}
    tokens = results["this"][0]["tokens"]
    print(f"\n{tokens:,} tokens ({batches} batches of 8, K = {args.mc_samples}), median of {args.rounds} rounds:")
    for k, label in (("wall_s", "wall"), ("cpu_s", "CPU")):
        b, t = med["baseline"][k], med["this"][k]
        print(f"  {label}: baseline {args.baseline} {b:,.0f} tokens/s, this checkout {t:,.0f} tokens/s, "
              f"ratio this/baseline {t / b:.3f}")
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    main()
