"""The two kinds of failure a user can cause, mapped to exit codes by `src.cli`."""


class UsageError(Exception):
    """Bad command line or config: exit code 2."""


class RunError(Exception):
    """A runtime failure or refusal the user can act on (bad data, run folder in use): exit code 1."""
