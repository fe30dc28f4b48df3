"""Typed errors that the command line reports as one clear line (no traceback).

Every problem with user input (files, configuration values) is raised as a subclass of
:class:`CryoavgError`. ``cryoavg.cli`` catches these, prints ``error: <message>`` on one line
to standard error and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from os import PathLike


class CryoavgError(Exception):
    """Base class of all user-facing errors; ``str(err)`` is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class InputError(CryoavgError):
    """A bad input file: missing, truncated, malformed or inconsistent.

    Parameters
    ----------
    path
        The offending file (named first in the message).
    problem
        What is wrong with it, in a few words.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(CryoavgError):
    """A bad configuration value (a command-line key out of range, inconsistent options)."""


class OutputError(CryoavgError):
    """An output could not be written (no space left, permission denied, ...)."""
