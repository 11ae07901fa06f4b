"""`prime-scale eval CKPT [--data DIR]`: the valid NLL bound (sub-token ELBO) per original token and its
perplexity, with K Monte Carlo noise draws per sequence and a standard error. The paper's joint
objective is shown too, labelled as a training objective: it is not a likelihood bound for ell > 1."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

from prime_scale.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a consolidated directory (prime-scale convert), a step_<N> folder, "
                                      "a checkpoint directory or a run directory")
    p.add_argument("--data", default=None, help="prepared dataset directory (default: the run's data)")
    p.add_argument("--split", default="val", help="dataset split to evaluate (default: val)")
    p.add_argument("--mc-samples", type=int, default=None, help="noise draws per sequence (default: recipe eval.mc_samples)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same numbers")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA weights when the run kept them")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON to this file")


def main(args: argparse.Namespace) -> int:
    from prime_scale.data import build_loader
    from prime_scale.evaluation import evaluate_bound
    from prime_scale.inference import load_model

    if args.batch_size < 1 or (args.mc_samples is not None and args.mc_samples < 1):
        raise UserError("--batch-size and --mc-samples must be at least 1")
    with load_model(args.checkpoint, args.weights) as loaded:
        cfg = loaded.cfg
        data = dataclasses.replace(cfg.data, num_workers=0, shuffle=False)
        if args.data is not None:
            data = dataclasses.replace(data, path=args.data, mixture=[])
        cfg = dataclasses.replace(cfg, data=data)
        loader = build_loader(cfg, args.split, 0, 1, args.batch_size, args.seed, epoch_limit=1)
        batches = itertools.islice(iter(loader), args.max_batches)
        result = evaluate_bound(loaded.logits, batches, vocab_size=loaded.vocab_size, ell=loaded.ell,
                                seed=args.seed, mc_samples=args.mc_samples or cfg.eval.mc_samples,
                                carry_over=cfg.model.carry_over)
    print(result.format_table())
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, **result.as_dict()}, indent=2))
        tmp.replace(out)
    return 0
