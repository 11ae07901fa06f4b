"""`prime-scale eval CKPT [--data DIR]`: the valid NLL bound (sub-token ELBO) per original token and its
perplexity, with K Monte Carlo noise draws per sequence and a standard error. The paper's joint
objective is shown too, labelled as a training objective: it is not a likelihood bound for ell > 1."""

from __future__ import annotations

import argparse
import json

from prime_scale.cli.common import add_weights_argument, check_number_options, json_stdout
from prime_scale.config.validation import ONE_UP, SEED_LIMIT, Span

SEED = Span(0, SEED_LIMIT, integer=True)  # the recipe's seed range: a run's validation uses its seed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a consolidated directory (prime-scale convert), a step_<N> folder, "
                                      "a checkpoint directory or a run directory")
    p.add_argument("--data", default=None, help="prepared dataset directory or URI (default: the run's data)")
    p.add_argument("--split", default="val", help="dataset split to evaluate")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="noise draws per sequence (default: the recipe's eval.mc_samples)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default: the run's seed, so the numbers equal its validation's)")
    add_weights_argument(p)
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the result as JSON to FILE ('-': print only the JSON on stdout)")


def main(args: argparse.Namespace) -> int:
    from prime_scale import fsio
    from prime_scale.inference import evaluate_checkpoint

    check_number_options(args, {"--batch-size": ONE_UP, "--mc-samples": ONE_UP, "--seed": SEED,
                                "--max-batches": Span(1, integer=True, note="leave it out to evaluate the "
                                                                             "whole split")})
    with json_stdout(args.json_out == "-"):
        _ensure_demo_data(args)
        result = evaluate_checkpoint(args.checkpoint, weights=args.weights, data=args.data, split=args.split,
                                     batch_size=args.batch_size, max_batches=args.max_batches, seed=args.seed,
                                     mc_samples=args.mc_samples)
        record = {"checkpoint": str(args.checkpoint), "split": args.split, **result.as_dict()}
        if args.json_out != "-":
            print(result.format_table())
    if args.json_out == "-":
        print(json.dumps(record, indent=2))
    elif args.json_out:
        fsio.write_atomic(args.json_out, json.dumps(record, indent=2))
    return 0


def _ensure_demo_data(args) -> None:
    """A run trained on the demo corpus evaluates on it: build it if this machine lacks it."""
    if args.data is not None:
        return
    from prime_scale.inference import recipe_of

    cfg = recipe_of(args.checkpoint)
    if cfg.data.path is None and not cfg.data.mixture:
        from data_prep.demo import ensure_demo_corpus

        ensure_demo_corpus(seq_len=cfg.model.seq_len)
