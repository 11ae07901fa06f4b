"""`prime-scale plan RECIPE [overrides] --gpus N [--gpu KIND] [--json] [--verify [--all | --ranks R,...]]`:
per pipeline stage, the parameters, memory (model state by ZeRO stage, activations, margin),
communication, FLOPs and predicted step time of one rank, and a verdict against the GPU's memory
with the knob that fixes a miss. --verify builds chosen ranks' real models on the meta device in
this process under a fake N-rank process group and requires the plan's parameter counts."""

from __future__ import annotations

import argparse
import json

from prime_scale.errors import OK, USER_ERROR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name or YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted-key overrides")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (the world size)")
    p.add_argument("--gpu", default="h100-80gb", help="GPU kind (default h100-80gb); see --list-gpus")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size when the recipe leaves it to the data")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--verify", action="store_true",
                   help="dry run: build ranks' real models on the meta device under a fake process group")
    p.add_argument("--all", action="store_true", help="with --verify: every rank, not a chosen few")
    p.add_argument("--ranks", default=None, help="with --verify: comma-separated global ranks")


def main(args: argparse.Namespace) -> int:
    from prime_scale import metrics
    from prime_scale.config import load_recipe
    from prime_scale.errors import UserError
    from prime_scale.planner.gpus import gpu_kind
    from prime_scale.planner.plan import make_plan, render

    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give the number of GPUs, at least 1")
    metrics.quiet_libraries()  # stdout carries the plan (--json: only the plan)
    cfg = load_recipe(args.recipe, args.overrides)
    plan = make_plan(cfg, args.gpus, gpu_kind(args.gpu), vocab=args.vocab)
    if args.verify:
        from prime_scale.planner.dryrun import verify

        ranks = None if args.ranks is None else [int(r) for r in args.ranks.split(",")]
        plan["verify"] = verify(cfg, args.gpus, plan, ranks=ranks, every_rank=args.all)
    if args.json:
        print(json.dumps(plan, indent=2, default=float))
    else:
        print(render(plan))
        if args.verify:
            v = plan["verify"]
            print(f"\nverify: {len(v['ranks'])} rank(s) built on the meta device under a fake {args.gpus}-rank "
                  f"process group in {v['seconds']:.1f} s: parameter counts "
                  f"{'equal the plan' if v['ok'] else 'DIFFER'}; topology {'agrees' if v['topology_ok'] else 'DIFFERS'}")
            for line in v["problems"]:
                print(f"  {line}")
            if not v["ok"]:
                return USER_ERROR
    return OK
