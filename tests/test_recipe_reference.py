"""The schema reference (docs/recipes.md, DOCS), `recipe show --defaults/--origin`, `recipe list`,
and errors blaming the key that was actually set where."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from prime_scale.cli import main as cli
from prime_scale.config import DOCS, RECIPES_DIR, Config, RecipeError, load_recipe, load_recipe_with_origins
from prime_scale.config.reference import REGENERATE, render_reference
from prime_scale.config.schema import leaf_keys, schema_fields

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
TINY = str(RECIPES_DIR / "tiny-cpu.yaml")


def test_docs_page_is_the_rendered_reference():
    assert DOCS_PAGE.is_file(), f"docs/recipes.md is missing; generate it with: {REGENERATE}"
    assert DOCS_PAGE.read_text() == render_reference(), \
        f"docs/recipes.md is out of date with the schema; regenerate it with: {REGENERATE}"


def test_every_schema_key_is_documented_and_docs_has_no_unknown_keys():
    keys = {f.key for f in schema_fields()}
    assert not keys - DOCS.keys(), f"schema keys without a DOCS line: {sorted(keys - DOCS.keys())}"
    assert not DOCS.keys() - keys, f"DOCS lines for unknown keys: {sorted(DOCS.keys() - keys)}"
    assert all(text.strip() for text in DOCS.values())
    assert {"model.ell", "parallel.dp", "data.mixture", "logging.wandb", "data.shuffle_block"} <= keys


def test_reference_lists_every_key_with_its_default():
    page = render_reference()
    for key in leaf_keys():
        assert f"| `{key}` |" in page
    assert "| `model.layers` | `int` | `2` |" in page
    assert "`'prime_joint' \\| 'prime_elbo'`" in page  # pipes escaped inside the table


def test_show_defaults_prints_the_schema_defaults(capsys):
    assert cli(["recipe", "show", "--defaults"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == dataclasses.asdict(Config())
    assert shown["model"]["layers"] == Config().model.layers
    assert shown["model"]["hidden"] == Config().model.hidden
    assert shown != load_recipe("tiny-cpu").to_dict()  # not the default recipe's values


def test_show_defaults_refuses_a_recipe(capsys):
    assert cli(["recipe", "show", "--defaults", "tiny-cpu"]) == 2
    assert "--defaults shows the schema alone" in capsys.readouterr().err


def test_origins_name_command_line_file_and_default():
    _, origins = load_recipe_with_origins("tiny-cpu", ["train.steps=3"])
    assert set(origins) == set(leaf_keys())
    assert origins["train.steps"] == "command line"
    assert origins["model.layers"] == TINY
    assert origins["model.rotary_base"] == "default"


def test_origins_through_a_base_chain(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny-cpu\nmodel:\n  layers: 3\n")
    _, origins = load_recipe_with_origins(str(child), ["model={hidden: 128}"])
    assert origins["model.hidden"] == "command line"
    assert origins["model.layers"] == "default"  # the override replaced the whole section
    assert origins["train.steps"] == TINY


def test_cli_origin_lines(capsys):
    assert cli(["recipe", "show", "tiny-cpu", "--origin", "train.steps=3"]) == 0  # options may follow
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(leaf_keys())
    assert rows["train.steps"][1:] == ["3", "command", "line"]
    assert rows["model.layers"][1] == "4" and rows["model.layers"][-1] == TINY
    assert rows["model.rotary_base"][-1] == "default"


def test_origin_only_with_show(capsys):
    assert cli(["recipe", "check", "--origin"]) == 2
    assert "--origin applies to `prime-scale recipe show` only" in capsys.readouterr().err


def test_list_prints_whole_descriptions(capsys):
    assert cli(["recipe", "list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        comment = " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines()
                           if line.startswith("#"))
        assert " ".join(comment.split()) in out, path.stem


def test_check_blames_command_line_dp_not_the_file(capsys):
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-cpu", ["parallel.dp=2"])
    msg = str(e.value)
    assert msg.startswith("command line: key 'parallel.dp'")
    assert "train.global_batch=8" in msg and "train.micro_batch × parallel.dp = 8 × 2" in msg
    assert cli(["recipe", "check", "tiny-cpu", "parallel.dp=2"]) == 2
    assert "error: command line: key 'parallel.dp'" in capsys.readouterr().err


def test_check_ok(capsys):
    assert cli(["recipe", "check", "tiny-cpu"]) == 0
    assert capsys.readouterr().out.strip() == "ok: tiny-cpu"
