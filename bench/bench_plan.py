"""The planner's memory model against real runs on this machine: model-state bytes predicted vs held
by real DeepSpeed engines (2 gloo processes: ZeRO 0–3 at DP = 2, bf16 ZeRO 1, TP = 2, PP = 2), and
activation bytes predicted vs the bytes autograd saves for backward (recompute none / selective /
full, ℓ = 1 and 3). Prints the markdown table of docs/scaling.md.

    python bench/bench_plan.py [--json out.json]

The measurements are tests/test_planner.py's own (every live tensor's storage counted once;
saved_tensors_hooks), so the table and the tests' 10% bounds come from one procedure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pytest

    import test_planner as t
    from harness.dist import launch

    rows = []
    for layout in t.STATE_LAYOUTS:
        _, plan = t._plan("tiny-cpu", 2, t.SMALL + layout)
        for per_rank in launch(2, "test_planner:measure_model_state", {"layouts": [layout]}, timeout=300):
            for r in per_rank:
                stage = plan["stages"][min(r["rank"], len(plan["stages"]) - 1) if plan["recipe"]["pp"] > 1 else 0]
                for when in ("between_steps", "at_step"):
                    rows.append({"what": "model state", "layout": " ".join(layout), "rank": r["rank"], "when": when,
                                 "measured": r[when], "predicted": stage["model_state"][when]})
    for ell in (1, 3):
        for recompute in ("none", "selective", "full"):
            measured, predicted = t.activation_bytes(recompute, ell)
            rows.append({"what": "activations", "layout": f"ℓ = {ell}, recompute {recompute}", "rank": 0,
                         "when": "forward", "measured": measured, "predicted": predicted})
    print("| what | layout | rank | when | measured MiB | predicted MiB | measured / predicted |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['what']} | {r['layout']} | {r['rank']} | {r['when']} | {r['measured'] / 2**20:.2f} | "
              f"{r['predicted'] / 2**20:.2f} | {r['measured'] / r['predicted']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    del pytest


if __name__ == "__main__":
    main()
