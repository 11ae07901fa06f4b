"""Who set each key, and the error that says so.

Every recipe error starts with the origin of the key at fault (a recipe file, "command line", or the
schema's defaults), so a user knows where to look. The loader records origins in a flat provenance
dict {dotted key: origin}; this module reads it. It sits below loading and validation, which both
raise RecipeError, so neither has to import the other for it.
"""

from __future__ import annotations

from typing import Iterator

from prime_scale.errors import UserError

COMMAND_LINE = "command line"
DEFAULT_ORIGIN = "default"  # the origin `recipe show --origin` gives a key no recipe or override set


class RecipeError(UserError):
    """A recipe or override is wrong. The message names the file and the key."""


def blame(key: str, provenance: dict) -> str:
    """The origin to blame in an error about `key`.

    The nearest recorded ancestor counts: a file that set a whole section (`data: {...}`) or a list
    (`data.mixture`) also set everything inside it, e.g. `data.mixture[0].weight`. Error messages
    have always said "defaults" for a key nobody set; keep it so they do not change.
    """
    probe = key
    while probe:
        if probe in provenance:
            return provenance[probe]
        probe = probe.rpartition(".")[0]
    return "defaults"


def leaf_keys(d: dict, prefix: str) -> Iterator[str]:
    """Every dotted key of a nested mapping, sections included (`model` and `model.layers`)."""
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaf_keys(v, f"{prefix}{k}.")
