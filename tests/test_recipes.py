"""Recipes: composition, overrides, validation, and the errors users see."""

import subprocess
import sys
import typing

import pytest

from prime_scale import cli as cli_main
from prime_scale.config import RECIPES_DIR, RecipeError, config_from_dict, leaf_keys, load_recipe, resolve_dp
from prime_scale.config.schema import schema_fields
from prime_scale.config.validation import RANGES

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
    ("modle:\n  layers: 3\n", [], r"bad\.yaml: unknown key 'modle' \(did you mean 'model'\?\)"),
    ("model:\n  layers: three\n", [], r"bad\.yaml: key 'model\.layers' expects an integer, got 'three'"),
    ("model:\n  carry_over: 1\n", [], r"key 'model\.carry_over' expects true or false"),
    ("model:\n  objective: mdlm\n", [], r"key 'model\.objective' expects one of 'prime_joint' \| 'prime_elbo'"),
    ("model:\n  hidden: 100\n  ell: 3\n", [], r"bad\.yaml: key 'model\.ell': model\.hidden=100 is not divisible by model\.ell=3"),
    ("model:\n  hidden: 130\n  heads: 4\n  ell: 1\n", [], r"key 'model\.heads': model\.hidden=130 is not divisible by model\.heads=4"),
    ("model:\n  ell: 0\n", [], r"key 'model\.ell': must be at least 1, got 0 \(the token granularity"),
    ("train:\n  global_batch: 10\n  micro_batch: 4\n", [], r"key 'train\.global_batch': 10 is not divisible by train\.micro_batch=4"),
    ("parallel:\n  dp: 3\n", [], r"not divisible by train\.micro_batch × parallel\.dp"),
    ("parallel:\n  pp: 2\n  zero_stage: 2\n", [], r"supports ZeRO stage 0 or 1 only"),
    ("", ["model.ell=-1"], r"command line: key 'model\.ell'"),
    ("", ["train.stepz=3"], r"command line: unknown key 'train\.stepz' in override 'train\.stepz=3' "
                            r"\(did you mean 'train\.steps'\?\)"),
    ("optim:\n  lr: .nan\n", [], r"bad\.yaml: key 'optim\.lr': must be a finite number > 0, got nan"),
    ("data:\n  mixture:\n    - {path: a, weight: .inf}\n", [],
     r"bad\.yaml: key 'data\.mixture\[0\]\.weight': must be a finite number > 0, got inf"),
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


# override, the key the error must name, and how it must spell the value ("got ...")
NONSENSE = [
    ("optim.lr=.nan", "optim.lr", "nan"), ("optim.lr=.inf", "optim.lr", "inf"), ("optim.lr=nan", "optim.lr", "nan"),
    ("optim.lr=1e400", "optim.lr", "inf"), ("optim.lr=0", "optim.lr", "0.0"), ("optim.lr=-1e-3", "optim.lr", "-0.001"),
    ("optim.clip=.nan", "optim.clip", "nan"), ("optim.clip=-1", "optim.clip", "-1.0"),
    ("optim.clip=.inf", "optim.clip", "inf"),
    ("optim.eps=0", "optim.eps", "0.0"), ("optim.eps=-1e-8", "optim.eps", "-1e-08"),
    ("optim.eps=.nan", "optim.eps", "nan"),
    ("optim.weight_decay=-1", "optim.weight_decay", "-1.0"), ("optim.weight_decay=.inf", "optim.weight_decay", "inf"),
    ("optim.min_lr_ratio=-5", "optim.min_lr_ratio", "-5.0"), ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio", "1.5"),
    ("optim.min_lr_ratio=.nan", "optim.min_lr_ratio", "nan"),
    ("optim.betas=[.nan, 0.99]", "optim.betas", "[nan, 0.99]"), ("optim.betas=[0.9, 1.0]", "optim.betas", "[0.9, 1.0]"),
    ("optim.betas=[-0.1, 0.99]", "optim.betas", "[-0.1, 0.99]"), ("optim.betas=[0.9]", "optim.betas", "[0.9]"),
    ("optim.ema=.nan", "optim.ema", "nan"), ("optim.ema=1", "optim.ema", "1.0"),
    ("optim.ema=-0.5", "optim.ema", "-0.5"),
    ("optim.warmup_steps=-1", "optim.warmup_steps", "-1"),
    ("model.init_std=.nan", "model.init_std", "nan"), ("model.init_std=0", "model.init_std", "0.0"),
    ("model.init_std=.inf", "model.init_std", "inf"),
    ("model.norm_eps=0", "model.norm_eps", "0.0"), ("model.norm_eps=-1e-5", "model.norm_eps", "-1e-05"),
    ("model.norm_eps=.nan", "model.norm_eps", "nan"),
    ("model.rotary_base=-1", "model.rotary_base", "-1.0"), ("model.rotary_base=1", "model.rotary_base", "1.0"),
    ("model.rotary_base=.inf", "model.rotary_base", "inf"), ("model.rotary_base=.nan", "model.rotary_base", "nan"),
    ("model.dropout=.nan", "model.dropout", "nan"), ("model.dropout=1", "model.dropout", "1.0"),
    ("model.layers=0", "model.layers", "0"), ("model.hidden=-8", "model.hidden", "-8"),
    ("model.heads=0", "model.heads", "0"), ("model.mlp_ratio=0", "model.mlp_ratio", "0"),
    ("model.seq_len=0", "model.seq_len", "0"), ("model.vocab_size=1", "model.vocab_size", "1"),
    ("model.ell=0", "model.ell", "0"),
    ("data.shuffle_block=0", "data.shuffle_block", "0"), ("data.num_workers=-1", "data.num_workers", "-1"),
    ("data.mixture=[{path: a, weight: .nan}]", "data.mixture[0].weight", "nan"),
    ("data.mixture=[{path: a}, {path: b, weight: 0}]", "data.mixture[1].weight", "0.0"),
    ("parallel.tp=0", "parallel.tp", "0"), ("parallel.pp=0", "parallel.pp", "0"),
    ("parallel.dp=-1", "parallel.dp", "-1"), ("parallel.zero_stage=4", "parallel.zero_stage", "4"),
    ("train.steps=0", "train.steps", "0"), ("train.global_batch=0", "train.global_batch", "0"),
    ("train.micro_batch=0", "train.micro_batch", "0"), ("train.log_every=0", "train.log_every", "0"),
    ("train.max_minutes=-1", "train.max_minutes", "-1.0"), ("train.max_minutes=.nan", "train.max_minutes", "nan"),
    ("train.max_minutes=.inf", "train.max_minutes", "inf"), ("train.max_skips=0", "train.max_skips", "0"),
    ("train.spike_factor=-1", "train.spike_factor", "-1.0"), ("train.spike_factor=.nan", "train.spike_factor", "nan"),
    ("train.spike_factor=0.5", "train.spike_factor", "0.5"), ("train.spike_factor=1", "train.spike_factor", "1"),
    ("train.spike_window=0", "train.spike_window", "0"),
    ("eval.every=-1", "eval.every", "-1"), ("eval.batches=0", "eval.batches", "0"),
    ("eval.mc_samples=0", "eval.mc_samples", "0"),
    ("checkpoint.every=-1", "checkpoint.every", "-1"), ("checkpoint.keep_last=0", "checkpoint.keep_last", "0"),
    ("seed=-1", "seed", "-1"), ("seed=4294967296", "seed", "4294967296"),
]
IDS = [override for override, _, _ in NONSENSE]


def test_every_number_key_of_the_schema_has_a_range():
    numbers = {int, float, typing.Optional[int], list[float]}
    keys = {f.key for f in schema_fields() if f.type in numbers}
    assert {"optim.lr", "model.ell", "data.mixture[].weight", "optim.betas", "seed"} <= keys
    missing = sorted(keys - RANGES.keys())
    assert not missing, f"number keys without a range in validation.RANGES: {missing}"


@pytest.mark.parametrize("override,key,got", NONSENSE, ids=IDS)
def test_nonsense_numbers_are_named_errors(override, key, got):
    """Every out-of-range or non-finite number is refused at load time, naming who set it, the key,
    the allowed range and the value (optim.min_lr_ratio=-5 used to train with a negative lr)."""
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", [override])
    msg = str(err.value)
    assert msg.startswith(f"command line: key '{key}': must be "), msg
    assert f", got {got}" in msg, msg


@pytest.mark.parametrize("override,key", [(o, k) for o, k, _ in NONSENSE], ids=IDS)
def test_recipe_check_exits_2_on_nonsense_numbers(override, key, capsys):
    assert cli_main.main(["recipe", "check", "tiny-cpu", override]) == 2
    captured = capsys.readouterr()
    assert f"command line: key '{key}': must be " in captured.err and "ok:" not in captured.out


def test_the_edges_of_every_range_are_accepted():
    """The special values the docs promise stay valid: 0 disables clipping / EMA / the time limit."""
    edges = ["optim.clip=0", "optim.ema=0", "optim.weight_decay=0", "optim.betas=[0, 0.999]", "optim.min_lr_ratio=0",
             "optim.warmup_steps=0", "model.dropout=0", "model.rotary_base=1.5", "model.vocab_size=2",
             "data.num_workers=0", "data.shuffle_block=1", "parallel.dp=0", "parallel.zero_stage=0",
             "train.max_minutes=0", "eval.every=0",
             "checkpoint.every=0", "checkpoint.keep_last=1", "seed=0", "seed=4294967295"]
    cfg = load_recipe("tiny-cpu", edges)
    assert (cfg.optim.clip, cfg.optim.ema, cfg.optim.betas, cfg.train.max_minutes) == (0.0, 0.0, [0, 0.999], 0.0)
    assert (cfg.data.num_workers, cfg.checkpoint.keep_last, cfg.seed) == (0, 1, 2**32 - 1)
    assert load_recipe("tiny-cpu", ["optim.min_lr_ratio=1", "train.max_minutes=0.5"]).optim.min_lr_ratio == 1.0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_recipe_check(path, capsys):
    assert cli_main.main(["recipe", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_a_stored_config_with_a_nonsense_number_is_refused():
    """A checkpoint's config.json goes through the same checks (resuming must not train on nan)."""
    with pytest.raises(RecipeError, match=r"^checkpoint config: key 'optim\.lr': must be a finite number > 0, got nan"):
        config_from_dict({"optim": {"lr": float("nan")}})


@pytest.mark.parametrize("override,message", [
    ("modle.layers=2", "command line: unknown key 'modle' in override 'modle.layers=2' (did you mean 'model.layers'?)"),
    ("optm.lr=1e-3", "command line: unknown key 'optm' in override 'optm.lr=1e-3' (did you mean 'optim.lr'?)"),
    ("model.layerz.x=2", "command line: unknown key 'model.layerz' in override 'model.layerz.x=2' "
                         "(did you mean 'model.layers'?)"),
    ("sed=3", "command line: unknown key 'sed' in override 'sed=3' (did you mean 'seed'?)"),
])
def test_a_mistyped_override_is_blamed_on_the_command_line(override, message, capsys):
    """It used to say `defaults: unknown key 'modle'`, sending the user to a file they never wrote."""
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", [override])
    assert str(err.value) == message
    assert cli_main.main(["recipe", "check", "tiny-cpu", override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("optim.betas=[x, 0.9]", "command line: key 'optim.betas[0]' expects a number, got 'x'"),
    ("data.mixture=[{path: a, weight: x}]", "command line: key 'data.mixture[0].weight' expects a number, got 'x'"),
    ("data.mixture=[{path: a, wieght: 2}]", "command line: unknown key 'data.mixture[0].wieght' "
                                           "(did you mean 'data.mixture[0].weight'?)"),
    ("data.mixture=[{weight: 2}]", "command line: 'data.mixture[0]': "),
])
def test_a_bad_list_item_on_the_command_line_blames_the_command_line(override, message):
    """Not the recipe file that set the list's section (tiny-cpu.yaml sets `data` and `optim`)."""
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-cpu", [override])
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("override,pattern", [
    ("zzz.q=1", r"^command line: unknown key 'zzz' in override 'zzz\.q=1' \(known keys: model, optim, "),
    ("model.zzz=1", r"^command line: unknown key 'model\.zzz' in override 'model\.zzz=1' \(known keys: layers, "),
])
def test_a_mistyped_override_without_a_close_match_lists_the_keys_there(override, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe("tiny-cpu", [override])
