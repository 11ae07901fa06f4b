"""Bad user input, and the exit codes of every prime-scale command (docs/cli.md has the table).

A UserError names the file, key, rank or flag and says what to do; the command line prints its
message once and exits with USER_ERROR. Under `prime-scale train --nproc N` each rank hands its
message to the local launcher instead (the file in $PRIME_SCALE_ERROR_DIR), which prints the
distinct messages once and exits with the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

OK = 0
INTERNAL_ERROR = 1  # a bug or a library failure: the traceback is printed
USER_ERROR = 2  # bad input (recipe, file, flag, launcher environment): one message, no traceback
INTERRUPTED = 130  # Ctrl-C (SIGINT)
PREEMPTED = 3  # stopped early on a signal or train.max_minutes, after a checkpoint was saved

EXIT_CODES = {
    OK: "success",
    INTERNAL_ERROR: "internal error (a traceback follows; please report it)",
    USER_ERROR: "bad input: a recipe, file, flag or launcher environment (the message names it)",
    INTERRUPTED: "interrupted (Ctrl-C)",
    PREEMPTED: "stopped early on request (SIGTERM, SIGUSR1, Ctrl-C or train.max_minutes) after saving a "
               "checkpoint: continue with --resume auto",
}

ERROR_DIR_ENV = "PRIME_SCALE_ERROR_DIR"


class UserError(Exception):
    """Bad input (a file, key, rank or flag). The message names it and says what to do."""


def report(command: str, message: str) -> int:
    """Show a user error: printed, or (a rank under the local launcher) left for the launcher."""
    line = f"prime-scale {command}: error: {message}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        Path(error_dir, f"rank_{os.environ.get('RANK', '0')}").write_text(line + "\n")
    else:
        import sys

        print(line, file=sys.stderr)
    return USER_ERROR
