"""The one exception type for bad user input: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (a file, key, rank or flag). The message names it and says what to do."""
