"""`prime-scale lm-eval ARGS...`: lm-evaluation-harness's own command line (`lm_eval ARGS...`) with the
prime-scale model registered, e.g.

    prime-scale lm-eval run --model prime-scale --model_args path=exports/tiny --tasks lambada_openai

The backend is declared under the harness's `lm_eval.models` entry points, which lm-eval releases
with plugin discovery find by themselves (`lm_eval run --model prime-scale ...`); releases without
it (0.4.13) resolve --model before any other package's code can run, so this command imports the
backend first and then hands every argument to the harness unchanged. Needs the `eval` extra."""

from __future__ import annotations

import sys

from prime_scale.errors import UserError

RAW_ARGUMENTS = True  # everything after `lm-eval` is the harness's: no parsing here


def run(argv: list[str]) -> int:
    try:
        import prime_scale.lm_eval_model  # noqa: F401  (registers --model prime-scale)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}); install prime-scale with its eval "
                        "extra: pip install -e '.[eval]' (docs/evaluation.md)") from None
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
