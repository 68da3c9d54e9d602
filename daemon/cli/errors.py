"""The command line's one user-facing error, in a module of its own so that every CLI module
(cli.py, ctl.py) can raise it without importing the other."""


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""
