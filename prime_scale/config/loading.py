"""Reading recipes: file references, `base:` chains, overrides, provenance, and type-checking.

A recipe is a YAML file. It may name a `base:` recipe (a path relative to itself, or a name in
recipes/) and override any subset of it; bases chain, cycles are an error. Command-line overrides
use dotted keys (`model.layers=4 parallel.tp=2`). While merging, the loader records which file (or
"command line") set each key, so that every error, and `recipe show --origin`, can name it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from prime_scale.config.provenance import COMMAND_LINE, DEFAULT_ORIGIN, RecipeError, blame, leaf_keys
from prime_scale.config.schema import Config, leaf_keys as schema_leaf_keys
from prime_scale.config.validation import blame_item, validate

# the repository's recipes/ folder: prime_scale/config/loading.py -> ../../../recipes
RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"
DEFAULT_RECIPE = "tiny-cpu"


# --------------------------------------------------------------------------- files and bases


def resolve_recipe_path(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe reference is a path (absolute, or relative to the referring file or the cwd)
    or a bare name in recipes/ (with or without .yaml)."""
    candidates = []
    p = Path(ref)
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to.parent / p)
    candidates.append(p)
    for name in (ref, ref + ".yaml"):
        candidates.append(RECIPES_DIR / name)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    place = f"{relative_to}: base" if relative_to else "recipe"
    names = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"{place} '{ref}' not found (looked for a file, and for a name in {RECIPES_DIR}: {names})")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)  # safe_load: a recipe cannot run code (!!python tags are refused)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: str, provenance: dict, prefix: str = "") -> None:
    """Deep-merge src into dst, recording which file set each key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, provenance, dotted + ".")
        else:
            dst[key] = value
            provenance[dotted] = origin
            if isinstance(value, dict):
                for sub in leaf_keys(value, dotted + "."):
                    provenance[sub] = origin


def _load_chain(path: Path, seen: tuple[Path, ...], provenance: dict) -> dict:
    """The merged tree of a recipe and its bases, the base first so the recipe wins."""
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{path}: base cycle: {chain}")
    data = _read_yaml(path)
    base_ref = data.pop("base", None)
    merged: dict = {}
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise RecipeError(f"{path}: key 'base' must be a recipe name or path, got {base_ref!r}")
        merged = _load_chain(resolve_recipe_path(base_ref, relative_to=path), (*seen, path), provenance)
    _merge(merged, data, str(path), provenance)
    return merged


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value`, the value read as YAML (so `3`, `3e-4`, `null`, `[0.9, 0.99]` have types)."""
    if "=" not in text:
        raise RecipeError(f"{COMMAND_LINE}: override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"{COMMAND_LINE}: override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_override_key(key: str, text: str) -> None:
    """Refuse an override whose key is not in the schema, naming the override and the nearest key.

    _build would catch it too, but only as an unknown section with no origin recorded for it
    (`modle.layers=2` records `modle.layers`, not `modle`), so it blamed "defaults"; here the
    override itself is still at hand. Parts past a leaf (`model.layers.x`) are left to the type
    check, which says what the leaf expects.
    """
    cls: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            wrong = ".".join(parts[: depth + 1])
            close = _closest(parts)
            # a suggestion that stops above the wrong part (`model` for model.zzz) helps nobody
            hint = (f" (did you mean '{'.'.join(close)}'?)" if len(close) > depth
                    else f" (known keys: {', '.join(f.name for f in dataclasses.fields(cls))})")
            raise RecipeError(f"{COMMAND_LINE}: unknown key '{wrong}' in override '{text}'{hint}")
        cls = hints[part]


def _closest(parts: list[str]) -> list[str]:
    """The schema key nearest to `parts`, corrected level by level (`optm.lr` -> optim.lr), stopping
    at a leaf or at a level with nothing close; [] when even the first part has no close name."""
    cls: Any = Config
    out: list[str] = []
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            break
        hints = typing.get_type_hints(cls)
        close = [part] if part in hints else difflib.get_close_matches(part, list(hints), n=1, cutoff=0.5)
        if not close:
            break
        out.append(close[0])
        cls = hints[close[0]]
    return out


def _apply_override(tree: dict, key: str, value: Any, provenance: dict) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    provenance[key] = COMMAND_LINE
    if isinstance(value, dict):  # `model={layers: 3}` replaces the section: its keys are ours now
        for sub in leaf_keys(value, key + "."):
            provenance[sub] = COMMAND_LINE


# --------------------------------------------------------------------------- entry points


def _present(tree: dict, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_recipe_with_origins(ref: Optional[str] = None,
                             overrides: typing.Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """load_recipe, and where each schema leaf key got its value: {key: origin}.

    The origin is a recipe file's path, "command line", or "default" for a key that nothing set
    (the schema's default). Keys are every settable leaf of the schema (schema.leaf_keys()).
    """
    provenance: dict[str, str] = {}
    if ref is None:
        ref = DEFAULT_RECIPE
    tree = _load_chain(resolve_recipe_path(ref), (), provenance)
    for text in overrides:
        key, value = parse_override(text)
        _check_override_key(key, text)
        _apply_override(tree, key, value, provenance)
    cfg = _build(Config, tree, "", provenance)
    validate(cfg, provenance)
    # a key absent from the merged tree is at its default, whatever stale provenance says (a
    # section replaced by an override); a present one was set by its nearest recorded ancestor
    origins = {key: blame(key, provenance) if _present(tree, key) else DEFAULT_ORIGIN
               for key in schema_leaf_keys()}
    return cfg, origins


def load_recipe(ref: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a recipe (path or name; None: the embedded default), apply overrides, validate."""
    return load_recipe_with_origins(ref, overrides)[0]


def config_from_dict(tree: dict, where: str = "checkpoint config") -> Config:
    """A Config from a resolved recipe stored as a mapping (a checkpoint's config.json)."""
    provenance = {key: where for key in leaf_keys(tree, "")}
    cfg = _build(Config, tree, "", provenance)
    validate(cfg, provenance)
    return cfg


# --------------------------------------------------------------------------- typing


def type_name(tp) -> str:
    """A schema type as users read it in errors and in docs/recipes.md ("int or null")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, provenance: dict) -> Any:
    """`value` as schema type `tp`, or a RecipeError naming who set `key` and what was expected."""
    def bad(expected: str = None):
        return RecipeError(
            f"{blame_item(key, provenance)}: key '{key}' expects {expected or type_name(tp)}, got {value!r}"
        )

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, provenance)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {type_name(tp)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, item, f"{key}[{i}]", provenance) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key + ".", provenance)
    return _coerce_scalar(value, tp, key, bad)


def _coerce_scalar(value: Any, tp, key: str, bad) -> Any:
    # bool is an int in Python, and YAML's `1` is no `true`: each scalar type is checked exactly
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept any number spelled as text
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _build(cls, data: dict, prefix: str, provenance: dict):
    """An instance of schema dataclass `cls` from a mapping; unknown keys get a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise RecipeError(f"{blame_item(dotted, provenance)}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, provenance)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (no default) is missing
        raise RecipeError(f"{blame_item(prefix.rstrip('.'), provenance)}: '{prefix.rstrip('.')}': {e}") from None
