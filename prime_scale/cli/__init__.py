"""The `prime-scale` command. Each subcommand is a module of this package, imported only when used,
so `prime-scale --help` stays fast and a subcommand's heavy imports (torch, deepspeed) are paid only
by the subcommands that need them.

A subcommand module exposes `add_arguments(parser)` and `main(args) -> int`;
options and recipe overrides may come in any order. A module that wraps another program's command
line sets RAW_ARGUMENTS and exposes `run(argv) -> int` instead. Exit codes: prime_scale.errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prime_scale import __version__
from prime_scale.errors import EXIT_CODES, INTERRUPTED, USER_ERROR, UserError, report

SUBCOMMANDS = ("recipe", "prep", "plan", "train", "eval", "lm-eval", "sample", "convert", "checkpoint")
MODULES = {"lm-eval": "harness"}  # a subcommand's module where its name is not a Python name
HELP = {
    "recipe": "list, show or validate recipes (with overrides); show the schema and its defaults",
    "prep": "prepare data: train a tokenizer, shard a corpus, build the demo corpus, inspect a dataset",
    "plan": "what a recipe needs on N GPUs: memory per rank, communication, step time; --verify: a dry run",
    "train": "train a Prime model from a recipe",
    "eval": "evaluate the valid NLL bound (sub-token ELBO) and perplexity of a checkpoint",
    "lm-eval": "run lm-evaluation-harness (its own arguments) with the prime-scale model registered",
    "sample": "generate text with the ancestral sub-token sampler",
    "convert": "consolidate a sharded checkpoint into one safetensors file",
    "checkpoint": "verify checkpoints: every file against its manifest's sizes and content hashes",
}


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    return f"Run 'prime-scale COMMAND --help' for a command's options.\n\nexit codes:\n{codes}"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prime-scale", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretraining for partial-masking discrete diffusion language models (MDM-Prime).",
        epilog=_epilog())
    parser.add_argument("--version", action="version", version=f"prime-scale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        sub.add_parser(name, help=HELP[name], add_help=False)
    return parser


def command_module(name: str):
    """The module of subcommand `name` (imported now)."""
    return importlib.import_module(f"prime_scale.cli.{MODULES.get(name, name)}")


def build_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"prime-scale {name}", description=HELP[name],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # options may follow positional recipe overrides; argparse cannot intermix around subparsers
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv or ["--help"])  # prints help / a usage error and exits
        return USER_ERROR
    name, rest = argv[0], argv[1:]
    module = command_module(name)
    try:
        if getattr(module, "RAW_ARGUMENTS", False):  # a wrapped command line: its arguments are its own
            return int(module.run(rest) or 0)
        return int(module.main(_parse(build_parser(name, module), rest)) or 0)
    except UserError as e:
        return report(name, str(e))
    except KeyboardInterrupt:
        print(f"prime-scale {name}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
