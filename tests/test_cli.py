"""The command line as a user meets it: options and overrides in any order, help text with defaults
on every option, one exit-code table that also holds under --nproc (the user error printed once)."""

from __future__ import annotations

import argparse
import sys

import pytest

from prime_scale import cli, errors


def _args(command: str, argv: list[str]) -> argparse.Namespace:
    module = cli.command_module(command)
    return cli._parse(cli.build_parser(command, module), argv)


def test_options_and_overrides_mix_in_any_order():
    a = _args("train", ["tiny-cpu", "--resume", "auto", "train.steps=2", "--nproc", "2", "model.layers=3"])
    assert (a.recipe, a.overrides, a.resume, a.nproc) == ("tiny-cpu", ["train.steps=2", "model.layers=3"], "auto", 2)
    b = _args("train", ["--nproc", "2", "tiny-cpu", "train.steps=2", "model.layers=3", "--resume", "auto"])
    assert vars(a) == vars(b)


@pytest.mark.parametrize("command", [c for c in cli.SUBCOMMANDS
                                     if not getattr(cli.command_module(c), "RAW_ARGUMENTS", False)])
def test_every_option_has_help_text(command):
    parser = cli.build_parser(command, cli.command_module(command))
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    for p in parsers:
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help text"


def test_lm_eval_hands_its_arguments_to_the_harness(capsys, monkeypatch):
    """`prime-scale lm-eval` is the harness's command line: its --help is the harness's, exit 0."""
    import logging

    import lm_eval.utils

    # the harness configures its logger once per process (its own handler, no propagation): undo it
    # after this test, so later tests' log capture still sees lm_eval's records
    harness_logger = logging.getLogger("lm_eval")
    for name in ("handlers", "propagate", "level"):
        value = getattr(harness_logger, name)
        monkeypatch.setattr(harness_logger, name, list(value) if name == "handlers" else value)
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", lm_eval.utils._LOGGING_CONFIGURED)
    assert cli.main(["lm-eval", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model_args" in out and "--include_path" in out


def test_lm_eval_without_the_harness_says_which_extra_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if the eval extra were not installed
    assert cli.main(["lm-eval", "run", "--model", "prime-scale"]) == errors.USER_ERROR
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


def test_exit_code_table_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code in errors.EXIT_CODES:
        assert f"{code:>3}  " in out


def test_a_rank_error_under_nproc_is_reported_once_with_the_user_error_code(tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    code = cli.main(["train", "tiny-cpu", "train.global_batch=16", "train.micro_batch=8", f"data.path={missing}", f"run.dir={tmp_path / 'run'}", "--nproc", "2",
                     "--samples", "0"])
    err = capsys.readouterr().err
    assert code == errors.USER_ERROR, err
    assert err.count(str(missing)) == 1, err  # both ranks fail alike: one message
    assert err.startswith("prime-scale train: error:") and "Traceback" not in err, err
