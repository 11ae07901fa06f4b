"""Recipes: composition, overrides, validation, and the errors users see."""

import subprocess
import sys

import pytest

from prime_scale.config import RECIPES_DIR, RecipeError, load_recipe, resolve_dp

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    cfg = load_recipe(str(path))
    assert cfg.model.hidden % cfg.model.ell == 0


def test_shipped_set_covers_the_paper_and_large_topologies():
    names = {p.stem for p in SHIPPED}
    assert {"tiny-cpu", "owt-mdlm", "owt-prime-l2", "owt-prime-l4", "owt-prime-l6", "prime-1b", "prime-7b"} <= names
    assert [load_recipe(f"owt-prime-l{ell}").model.ell for ell in (2, 4, 6)] == [2, 4, 6]
    big = load_recipe("prime-7b")
    assert big.parallel.tp * big.parallel.pp > 1 and resolve_dp(big, 64) == 8
    assert resolve_dp(load_recipe("prime-1b"), 8) == 4


def test_parameter_counts_of_large_recipes():
    """Rough parameter count: the ≈1B and ≈7B recipes are what their names say."""
    def params(cfg):
        m = cfg.model
        return m.layers * (4 * m.hidden**2 + 2 * m.mlp_ratio * m.hidden**2) + m.hidden * m.vocab_size
    assert 0.9e9 < params(load_recipe("prime-1b")) < 1.5e9
    assert 6e9 < params(load_recipe("prime-7b")) < 8e9


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_base_chain_and_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "base: tiny-cpu\nmodel:\n  layers: 3\ntrain:\n  steps: 7\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\nmodel:\n  hidden: 192\n")
    cfg = load_recipe(str(b), ["train.steps=9", "optim.lr=3e-4", "model.objective=prime_joint"])
    assert (cfg.model.layers, cfg.model.hidden, cfg.train.steps) == (3, 192, 9)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.objective == "prime_joint"
    assert cfg.model.heads == load_recipe("tiny-cpu").model.heads  # untouched keys come from the base
    assert a.exists()


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    write(tmp_path, "y.yaml", "base: x.yaml\n")
    with pytest.raises(RecipeError, match="base cycle"):
        load_recipe(str(tmp_path / "x.yaml"))


@pytest.mark.parametrize("text,overrides,pattern", [
    ("model:\n  layer: 3\n", [], r"bad\.yaml: unknown key 'model\.layer' \(did you mean 'model\.layers'\?\)"),
    ("modle:\n  layers: 3\n", [], r"unknown key 'modle' \(did you mean 'model'\?\)"),
    ("model:\n  layers: three\n", [], r"bad\.yaml: key 'model\.layers' expects an integer, got 'three'"),
    ("model:\n  carry_over: 1\n", [], r"key 'model\.carry_over' expects true or false"),
    ("model:\n  objective: mdlm\n", [], r"key 'model\.objective' expects one of 'prime_joint' \| 'prime_elbo'"),
    ("model:\n  hidden: 100\n  ell: 3\n", [], r"bad\.yaml: key 'model\.ell': model\.hidden=100 is not divisible by model\.ell=3"),
    ("model:\n  hidden: 130\n  ell: 1\n", [], r"key 'model\.heads': model\.hidden=130 is not divisible by model\.heads=4"),
    ("model:\n  ell: 0\n", [], r"key 'model\.ell': the token granularity must be at least 1"),
    ("train:\n  global_batch: 10\n  micro_batch: 4\n", [], r"key 'train\.global_batch': 10 is not divisible by train\.micro_batch=4"),
    ("parallel:\n  dp: 3\n", [], r"not divisible by train\.micro_batch × parallel\.dp"),
    ("parallel:\n  pp: 2\n  zero_stage: 2\n", [], r"supports ZeRO stage 0 or 1 only"),
    ("", ["model.ell=-1"], r"command line: key 'model\.ell'"),
    ("", ["train.stepz=3"], r"command line: unknown key 'train\.stepz' \(did you mean 'train\.steps'\?\)"),
    ("", ["train.steps"], r"must look like key\.sub=value"),
    ("base: no-such-recipe\n", [], r"bad\.yaml: base 'no-such-recipe' not found"),
    ("- a\n- b\n", [], r"a recipe must be a mapping"),
    ("model: [\n", [], r"not valid YAML"),
])
def test_bad_recipes_name_file_and_key(tmp_path, text, overrides, pattern):
    standalone = text.startswith(("base:", "- "))  # these must be the whole file
    p = write(tmp_path, "bad.yaml", text if standalone else "base: tiny-cpu\n" + text)
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(str(p), overrides)


def test_unsafe_yaml_tags_are_refused(tmp_path):
    p = write(tmp_path, "evil.yaml", "model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))


def test_resolve_dp_errors():
    cfg = load_recipe("tiny-cpu", ["parallel.tp=2", "model.heads=4"])
    with pytest.raises(RecipeError, match="world size 3 is not divisible by parallel.tp × parallel.pp = 2 × 1"):
        resolve_dp(cfg, 3)
    cfg = load_recipe("tiny-cpu", ["parallel.dp=2", "train.micro_batch=4"])
    with pytest.raises(RecipeError, match="parallel.dp=2 is pinned"):
        resolve_dp(cfg, 4)
    cfg = load_recipe("tiny-cpu", ["train.global_batch=12", "train.micro_batch=4"])
    with pytest.raises(RecipeError, match="global_batch=12 is not divisible by train.micro_batch × dp = 4 × 2"):
        resolve_dp(cfg, 2)
    assert resolve_dp(load_recipe("tiny-cpu"), 1) == 1


def test_cli_show_and_errors(tmp_path):
    ok = cli("recipe", "show", "tiny-cpu", "model.ell=4", "model.hidden=256")
    assert ok.returncode == 0 and "ell: 4" in ok.stdout
    missing = cli("recipe", "show", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml' not found" in missing.stderr
    bad = cli("recipe", "check", "tiny-cpu", "model.dropot=0.1")
    assert bad.returncode == 2 and "did you mean 'model.dropout'" in bad.stderr
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "convert" in top.stdout
