"""The `prime-scale` command. Each subcommand lives in its own module, imported only when used,
so `prime-scale --help` stays fast and a subcommand's heavy imports (torch, deepspeed) are paid
only by the subcommands that need them.

A subcommand module exposes `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prime_scale import __version__
from prime_scale.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "recipe": ("prime_scale.recipe_cmd", "show or validate a recipe with overrides"),
    "prep": ("prime_scale.data.prep_cmd", "prepare data: train a tokenizer, shard a corpus, build the demo corpus"),
    "train": ("prime_scale.train", "train a Prime model from a recipe"),
    "eval": ("prime_scale.evaluate", "evaluate the valid NLL bound and perplexity of a checkpoint"),
    "sample": ("prime_scale.sample", "generate text with the ancestral sub-token sampler"),
    "convert": ("prime_scale.checkpoint.convert", "consolidate a sharded checkpoint into safetensors"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prime-scale",
        description="Pretraining for partial-masking discrete diffusion language models (MDM-Prime).",
        epilog="Run 'prime-scale COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"prime-scale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv or ["--help"])  # prints help / a usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"prime-scale: '{name}' is not available in this build", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"prime-scale {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"prime-scale {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prime-scale {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
