"""`prime-scale recipe show|check RECIPE [overrides]`: the resolved recipe, after bases and overrides."""

from __future__ import annotations

import argparse
import sys

from prime_scale.config import RECIPES_DIR, load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "check", "list"],
                   help="show: print the resolved recipe; check: validate only; list: shipped recipes")
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe path or name in recipes/ (default: the embedded tiny-cpu recipe)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted-key overrides")


def main(args: argparse.Namespace) -> int:
    if args.action == "list":
        for path in sorted(RECIPES_DIR.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ").strip() if path.stat().st_size else ""
            print(f"{path.stem:20s} {first}")
        return 0
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `recipe show model.ell=2` means the default recipe
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_recipe(recipe, overrides)
    if args.action == "show":
        sys.stdout.write(cfg.to_yaml())
    else:
        print(f"ok: {recipe or 'tiny-cpu'}")
    return 0
