"""`prime-scale sample CKPT`: text from the ancestral sub-token sampler (docs/sampling.md).

Reports the network calls (NFE) and the idle-step ratio: a sequence is computed only at the steps
where it reveals a sub-token (and for the final fill when something is left), so NFE = non-idle
steps, plus one when the grid left something masked."""

from __future__ import annotations

import argparse
import json

from prime_scale.cli.common import add_weights_argument, check_number_options, json_stdout
from prime_scale.config.validation import ONE_UP, POSITIVE, SEED_LIMIT, Span


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a consolidated directory, a step_<N> folder, a checkpoint or run directory")
    p.add_argument("--steps", type=int, default=128, help="sampling steps")
    p.add_argument("--num", type=int, default=2, help="sequences to generate (one batch)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default: model.seq_len)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus probability; 1 samples the model's distribution exactly")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of each step")
    p.add_argument("--prompt", default=None, help="text prefix, kept fixed while the rest is generated")
    p.add_argument("--no-carry-over", dest="carry_over", action="store_false",
                   help="sample without the carry-over restriction (invalid codes are counted)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed: the same seed gives the same text")
    add_weights_argument(p)
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print one JSON object (and nothing else) on stdout instead of text")


def main(args: argparse.Namespace) -> int:
    from prime_scale.inference import generate, load_model

    # --length's upper bound is the checkpoint's model.seq_len: checked once it is loaded
    check_number_options(args, {"--steps": ONE_UP, "--num": ONE_UP, "--length": ONE_UP, "--temperature": POSITIVE,
                                "--top-p": Span(0.0, 1.0, lo_open=True, hi_open=False),
                                "--seed": Span(0, SEED_LIMIT, integer=True)})
    with json_stdout(args.json_out):
        with load_model(args.checkpoint, args.weights) as loaded:
            texts, r = generate(loaded, steps=args.steps, num=args.num, length=args.length, top_p=args.top_p,
                                temperature=args.temperature, prompt=args.prompt, carry_over=args.carry_over,
                                seed=args.seed)
    stats = {"steps": r.steps, "nfe": r.nfe, "seq_nfe": r.seq_nfe.tolist(), "idle_steps": r.idle_steps, "isr": r.isr,
             "invalid_codes": r.invalid_codes, "weights": loaded.weights}
    if args.json_out:
        print(json.dumps({"samples": texts, **stats}, indent=2))
        return 0
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    print(f"--- {r.steps} steps, {r.nfe} network calls, idle-step ratio {r.isr:.2%}, "
          f"invalid codes {r.invalid_codes}, {loaded.weights} weights")
    return 0
