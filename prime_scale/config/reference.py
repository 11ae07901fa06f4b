"""The schema's defaults and its reference page, both derived from prime_scale.config.schema.

docs/recipes.md is the output of render_reference(), so the page cannot drift from the code: a
test compares the two. After changing the schema or DOCS, regenerate it with

    python -m prime_scale.config.reference > docs/recipes.md
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from prime_scale.config.loading import DEFAULT_RECIPE, type_name
from prime_scale.config.schema import DOCS, REQUIRED, Config, schema_fields

REGENERATE = "python -m prime_scale.config.reference > docs/recipes.md"


def schema_defaults() -> dict:
    """What a recipe without `base:` starts from: every key at the schema's default."""
    return Config().to_dict()


def defaults_yaml() -> str:
    """schema_defaults() as a recipe would spell it (`recipe show --defaults`)."""
    return yaml.safe_dump(schema_defaults(), sort_keys=False, allow_unicode=True)


def flow(value: Any) -> str:
    """One value on one line, spelled as YAML reads it back (`null`, `true`, `[0.9, 0.999]`)."""
    if value is REQUIRED:
        return "required"
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
    if text.endswith("\n..."):  # PyYAML ends a bare scalar document with an explicit end marker
        text = text[: -len("\n...")]
    return text


def _cell(text: str) -> str:
    # a bare | would split a markdown table cell; GitHub honours \| even inside code spans
    return text.replace("|", "\\|")


INTRO = f"""\
# Recipes: the schema reference

<!-- Generated from prime_scale/config/schema.py; do not edit. Regenerate with:
     {REGENERATE} -->

A recipe is a YAML file of sections (`model`, `optim`, `data`, ...) that sets any subset of the keys
below; every other key keeps its schema default (the **Default** column, also printed by
`prime-scale recipe show --defaults`). Every value is type-checked and cross-checked before any
work starts, and every error names the file (or `command line`) and the key.

## Bases and overrides

- `base: NAME` starts from another recipe: a path relative to the recipe itself, or a name in
  `recipes/` (`base: owt-base`). Bases chain; a cycle is an error. The recipe's own keys win,
  section by section (setting `model.ell` keeps the base's other `model` keys).
- Dotted overrides after the recipe win over both: `prime-scale train tiny-cpu model.layers=2
  optim.lr=1e-3`. Values are read as YAML: `null`, `true`, `3e-4`, `[0.9, 0.99]`.
- With no recipe, commands use the embedded default, `{DEFAULT_RECIPE}`.
- `prime-scale recipe show RECIPE [overrides]` prints the resolved recipe; `--origin` adds, for every
  key, the file that set it, `command line`, or `default`. `prime-scale recipe check` only validates,
  and `prime-scale recipe list` describes the shipped recipes.

## Special values

- `parallel.dp: 0` (the default) means auto: the world size / (`parallel.tp` × `parallel.pp`). Pin
  it only to make a launch with the wrong number of processes fail; `train.global_batch` must be
  divisible by `train.micro_batch` × dp either way.
- `model.vocab_size: null` takes V from the prepared data's manifest.
- `data.path: null` (with no `data.mixture`) trains on the demo corpus, built by
  `prime-scale prep demo` (and on first use) under `$PRIME_SCALE_DEMO_DIR`, else `data/demo`.
- `data.mixture` samples several prepared datasets by weight, instead of `data.path`:

  ```yaml
  data:
    mixture:
      - path: data/openwebtext-gpt2-1024
        weight: 3.0
      - path: data/code-gpt2-1024
        weight: 1.0
  ```

## Choosing ℓ

`model.ell` (ℓ) splits every token into ℓ sub-tokens; ℓ = 1 is ordinary masked diffusion (MDLM).
Each sub-token gets `model.hidden / ℓ` embedding dims, so `model.hidden % model.ell == 0`; attention
needs `model.hidden % model.heads == 0` with an even head dim. For example hidden 768 with 12 heads
admits ℓ = 1, 2, 3, 4, 6 (the shipped `owt-prime-l2/l4/l6` recipes).
"""


def render_reference() -> str:
    """docs/recipes.md: the intro, then one table per section with every key's type, default and
    meaning (DOCS). Keys inside list items appear as `data.mixture[].path`."""
    sections: dict[str, list[str]] = {}
    for f in schema_fields():
        section = f.key.split(".")[0] if "." in f.key else "top level"
        rows = sections.setdefault(section, [])
        default = "required" if f.default is REQUIRED else f"`{_cell(flow(f.default))}`"
        rows.append(f"| `{f.key}` | `{_cell(type_name(f.type))}` | {default} | {_cell(DOCS.get(f.key, ''))} |")
    out = [INTRO, "## Keys\n"]
    for section, rows in sections.items():
        title = "Top-level keys" if section == "top level" else f"`{section}`"
        out += [f"### {title}\n", "| Key | Type | Default | Meaning |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_reference())
