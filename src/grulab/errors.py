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
