"""Errors that stem from what a user gave us (a file, a flag, a checkpoint).

The CLI prints their message as one line and exits non-zero; from Python they
are ordinary ValueErrors, so ``except ValueError`` keeps working.
Each message says what is wrong, names the offender and says how to fix it.
"""


class GrulabError(ValueError):
    """A problem with user input; the message is meant for the user's eyes."""

    exit_code = 1


class UsageError(GrulabError):
    """A bad command-line value (exit code 2, as argparse uses)."""

    exit_code = 2


class ConfigError(GrulabError):
    """A config value that breaks its field's rule; names the parameter, not a flag.

    ``str(e)`` reads "hidden must be a positive integer, got -3"; the CLI
    turns ``name`` into the flag the user typed ("--hidden ...").
    """

    def __init__(self, name: str, want: str, value) -> None:
        self.name, self.want, self.value = name, want, value
        super().__init__(f"{name} must be {want}, got {value!r}")
