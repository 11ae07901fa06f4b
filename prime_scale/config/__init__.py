"""Recipes: the one configuration mechanism of prime-scale.

A recipe is a YAML file. It may name a `base:` recipe (a path relative to itself, or a name in
recipes/) and override any subset of it; bases chain, cycles are an error. Command-line overrides
use dotted keys (`model.layers=4 parallel.tp=2`). Everything is checked against the typed schema
before any work starts, and every error names the file (or "command line") and the key.

The package has one module per concern: schema (the dataclasses and DOCS), loading (files, bases,
overrides, provenance, type-checking), validation (cross-key checks, resolve_dp), provenance (origins
and RecipeError), reference (schema defaults and docs/recipes.md). This file re-exports the public
names, so `from prime_scale.config import ...` is the import everywhere else.

reference is deliberately not imported here: `python -m prime_scale.config.reference` would
otherwise find it already imported (a RuntimeWarning), and nothing at run time needs it.
"""

from prime_scale.config.loading import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    config_from_dict,
    load_recipe,
    load_recipe_with_origins,
    parse_override,
    resolve_recipe_path,
)
from prime_scale.config.provenance import COMMAND_LINE, DEFAULT_ORIGIN, RecipeError
from prime_scale.config.schema import (
    DOCS,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    MixtureEntry,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    leaf_keys,
    schema_fields,
)
from prime_scale.config.validation import resolve_dp, resolve_zero_stage, validate

__all__ = [
    "COMMAND_LINE", "DEFAULT_ORIGIN", "DEFAULT_RECIPE", "DOCS", "RECIPES_DIR",
    "CheckpointConfig", "Config", "DataConfig", "EvalConfig", "LoggingConfig", "MixtureEntry",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RecipeError", "RunConfig", "TrainConfig",
    "config_from_dict", "leaf_keys", "load_recipe", "load_recipe_with_origins", "parse_override",
    "resolve_dp", "resolve_recipe_path", "resolve_zero_stage", "schema_fields", "validate",
]
