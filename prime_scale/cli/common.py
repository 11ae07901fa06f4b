"""Argument pieces shared by several subcommands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

WEIGHTS = ("auto", "ema", "raw")
WEIGHTS_HELP = ("which weights: ema (the run's exponential moving average), raw (the training weights), "
                "or auto: ema when the checkpoint holds them, else raw")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe file or name in recipes/ (default: the embedded tiny-cpu recipe)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="recipe overrides with dotted keys, e.g. model.layers=4 parallel.tp=2 (docs/recipes.md)")


def recipe_and_overrides(args: argparse.Namespace) -> tuple[Optional[str], list[str]]:
    """`prime-scale train model.layers=2` has no recipe, only overrides."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHTS, default="auto", help=WEIGHTS_HELP)


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """While the work runs, everything written to stdout (by us, libraries, or C code) goes to
    stderr, so that what the command prints on stdout afterwards is only its JSON."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def check_number_options(args: argparse.Namespace, ranges: dict) -> None:
    """Refuse an out-of-range number option before anything is loaded: {"--flag": Span} (the recipe
    validator's ranges, so nan and ±inf are never in range); an option left at None is not checked."""
    from prime_scale.errors import UserError

    for flag, span in ranges.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value not in span:
            raise UserError(f"{flag} must be {span}, got {value}" + (f" ({span.note})" if span.note else ""))
