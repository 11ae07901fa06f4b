"""Monte Carlo error of the lm-eval backend's bound against K, the draws per request (docs/evaluation.md).

    python bench/lm_eval_k_variance.py [CHECKPOINT] [--rows 32] [--seeds 5] [--ks 1,4,16,64]

Scores rows of the checkpoint's validation split as the backend scores requests
(prime_scale.conditional, the code every request type goes through), in two shapes:
- window: 1 context token + seq_len − 1 continuation tokens (a full rolling-perplexity window);
- choice: the first 3/4 of a row as context, the last 1/4 as continuation (a multiple-choice-like
  request: a long context, a short continuation).
For each K it repeats the scoring under `--seeds` noise seeds and reports: the mean bound per
token; its Monte Carlo standard error, from each request's variance across seeds (independent
draws) pooled over the requests — the honest error of one run's number; what the backend logs from
one run's own draws instead (sample s.d. / √K, conservative: the draws are stratified); the same
two for one request's total; and the time per request on this machine.
Default checkpoint: the ℓ = 2 ELBO cell of bench/ell_study.py (4 × 128, 500 steps on the demo).
Results: a table on stdout and bench/results/lm_eval_k.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(ROOT / "runs/ell-study/ell2-elbo"))
    p.add_argument("--rows", type=int, default=32, help="validation rows scored per shape")
    p.add_argument("--seeds", type=int, default=5, help="noise seeds per K")
    p.add_argument("--ks", default="1,4,16,64", help="draws per request to measure")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--json", default=str(ROOT / "bench/results/lm_eval_k.json"))
    args = p.parse_args()
    torch.set_num_threads(2)

    from prime_scale import fsio
    from prime_scale.conditional import conditional_bounds
    from prime_scale.data import build_loader
    from prime_scale.inference import load_model

    ks = [int(k) for k in args.ks.split(",")]
    with load_model(args.checkpoint) as loaded:
        cfg = loaded.cfg
        source = dataclasses.replace(cfg.data, num_workers=0, shuffle=False)
        loader = build_loader(dataclasses.replace(cfg, data=source), "val", 0, 1, 8, cfg.seed, single_pass=True)
        rows = []
        for batch in loader:
            rows += [r.tolist() for r, ok in zip(batch["input_ids"], batch.get("valid", [True] * len(batch["input_ids"])))
                     if ok]
            if len(rows) >= args.rows:
                break
        rows = rows[: args.rows]
        L = len(rows[0])
        shapes = {"window": [(r[:1], r[1:]) for r in rows], "choice": [(r[: 3 * L // 4], r[3 * L // 4:]) for r in rows]}
        print(f"{args.checkpoint}: V={loaded.vocab_size}, ell={loaded.ell}, seq_len={L}, {len(rows)} validation rows, "
              f"{args.seeds} seeds per K, device {loaded.device}", flush=True)
        records = []
        for shape, pairs in shapes.items():
            tokens = sum(len(c) for _, c in pairs)
            for K in ks:
                runs, logged, seconds = [], [], []  # runs[seed][request]: the bound of each request
                for seed in range(args.seeds):
                    started = time.perf_counter()
                    bounds = conditional_bounds(loaded.logits, pairs, vocab_size=loaded.vocab_size, ell=loaded.ell,
                                                seed=seed, mc_samples=K, carry_over=cfg.model.carry_over,
                                                batch_size=args.batch_size, device=loaded.device)
                    seconds.append((time.perf_counter() - started) / len(pairs))
                    runs.append([b.nll for b in bounds])
                    if K > 1:
                        logged.append(math.sqrt(sum(b.stderr ** 2 for b in bounds)))
                # each request's variance across seeds (independent draws), pooled over the requests: the
                # total's variance is their sum, since different requests' noise is independent
                variances = [statistics.variance(column) for column in zip(*runs)]
                record = {"shape": shape, "K": K, "continuation_tokens": len(pairs[0][1]), "requests": len(pairs),
                          "seeds": args.seeds,
                          "bound_nats_per_token": statistics.fmean(sum(r) for r in runs) / tokens,
                          "se_per_token": math.sqrt(sum(variances)) / tokens,
                          "se_logged_per_token": statistics.fmean(logged) / tokens if logged else math.nan,
                          "se_one_request_nats": math.sqrt(statistics.fmean(variances)),
                          "se_one_request_logged_nats": statistics.fmean(logged) / math.sqrt(len(pairs)) if logged
                          else math.nan,
                          "seconds_per_request": statistics.median(seconds)}
                records.append(record)
                print(json.dumps(record), flush=True)
    print("\n| shape | K | bound (nats/token) | Monte Carlo s.e. per token | as logged by one run | s.e. of one request "
          "(nats) | as logged | s per request |\n|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['shape']} ({r['continuation_tokens']} tokens) | {r['K']} | {r['bound_nats_per_token']:.4f} | "
              f"{r['se_per_token']:.4f} | {_or_dash(r['se_logged_per_token'])} | {r['se_one_request_nats']:.2f} | "
              f"{_or_dash(r['se_one_request_logged_nats'], '{:.2f}')} | {r['seconds_per_request']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    fsio.write_atomic(args.json, json.dumps({"checkpoint": args.checkpoint, "records": records}, indent=2))
    return 0


def _or_dash(value: float, fmt: str = "{:.4f}") -> str:
    return "–" if not math.isfinite(value) else fmt.format(value)


if __name__ == "__main__":
    sys.exit(main())
