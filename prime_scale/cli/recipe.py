"""`prime-scale recipe list|show|check`: the shipped recipes, a resolved recipe, the schema.

- list: every shipped recipe with its description (the comment block at the top of its file).
- show [RECIPE] [overrides]: the resolved recipe as YAML, after bases and overrides;
  --origin also says who set each key; --defaults prints the schema's own defaults instead.
- check [RECIPE] [overrides]: validate only.

All of it reads prime_scale.config, so what is shown is what `prime-scale train` would run.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from prime_scale.config import DEFAULT_ORIGIN, DEFAULT_RECIPE, RECIPES_DIR, RecipeError, load_recipe_with_origins
from prime_scale.config.reference import defaults_yaml, flow, schema_defaults
from prime_scale.config.schema import leaf_keys

NAME_WIDTH = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The dispatcher formats help with ArgumentDefaultsHelpFormatter: it appends "(default: …)" to
    # the options (--origin: False); the positionals say theirs in words, as None would mean nothing.
    p.add_argument("action", choices=["show", "check", "list"],
                   help="list: the shipped recipes and their descriptions; show: print the resolved "
                        "recipe as YAML; check: validate only (required, no default)")
    p.add_argument("recipe", nargs="?", default=None,
                   help=f"recipe path or name in recipes/ (default: the embedded {DEFAULT_RECIPE} recipe)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted-key overrides, applied after the recipe and its bases (default: none)")
    p.add_argument("--origin", action="store_true",
                   help="with show: list every key with its value and where it came from: the recipe "
                        "file that set it, 'command line', or 'default'")
    p.add_argument("--defaults", action="store_true",
                   help="with show: print the schema's own defaults, what a recipe without base: "
                        f"starts from (not {DEFAULT_RECIPE}'s values), instead of a recipe")


def main(args: argparse.Namespace) -> int:
    if args.action != "show" and (args.origin or args.defaults):
        flag = "--origin" if args.origin else "--defaults"
        raise RecipeError(f"{flag} applies to `prime-scale recipe show` only")
    if args.action == "list":
        _list()
        return 0
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `recipe show model.ell=2` means the default recipe
        recipe, overrides = None, [recipe, *overrides]
    if args.defaults:
        if recipe is not None or overrides:
            raise RecipeError("--defaults shows the schema alone; drop the recipe and overrides "
                              "(or drop --defaults to see them resolved)")
        if args.origin:
            _print_origins(schema_defaults(), {key: DEFAULT_ORIGIN for key in leaf_keys()})
        else:
            sys.stdout.write(defaults_yaml())
        return 0
    cfg, origins = load_recipe_with_origins(recipe, overrides)
    if args.action == "check":
        print(f"ok: {recipe or DEFAULT_RECIPE}")
    elif args.origin:
        _print_origins(cfg.to_dict(), origins)
    else:
        sys.stdout.write(cfg.to_yaml())
    return 0


def description(path: Path) -> str:
    """A recipe's description: its leading comment block, joined into one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def _list() -> None:
    # the whole description, wrapped under the name, so that no sentence is cut off
    width = 100
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        text = description(path) or "(no description)"
        wrapped = textwrap.wrap(text, width=width - NAME_WIDTH - 1, break_on_hyphens=False) or [""]
        print(f"{path.stem:{NAME_WIDTH}s} {wrapped[0]}")
        for line in wrapped[1:]:
            print(f"{'':{NAME_WIDTH}s} {line}")


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        node = node[part]
    return node


def _print_origins(tree: dict, origins: dict[str, str]) -> None:
    """One line per schema leaf key: key, value (as YAML), origin, in columns."""
    rows = [(key, flow(_lookup(tree, key)), origins[key]) for key in leaf_keys()]
    kw = max(len(k) for k, _, _ in rows)
    vw = max(len(v) for _, v, _ in rows)
    for key, value, origin in rows:
        print(f"{key:{kw}s}  {value:{vw}s}  {origin}")
