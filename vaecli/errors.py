"""The one exception hierarchy of vaecli.

Every error a user can cause is a `VaecliError`; its message is one line that says what went wrong and
what to do. The CLI prints it and exits with `exit_code` (1 for failures, 2 for usage errors); tracebacks
only appear with `--debug`. This module imports nothing from vaecli, so every layer may use it.
"""

from __future__ import annotations


class VaecliError(Exception):
    """Base class: a failure with a short, actionable message."""

    exit_code = 1


class UsageError(VaecliError):
    """The command line or the API call itself is wrong (unknown name, bad value)."""

    exit_code = 2


class InputError(VaecliError):
    """An input file is missing, unreadable or not what it claims to be."""


class CheckpointError(InputError):
    """A checkpoint cannot be used: unsafe format, corrupt, no VAE inside, wrong tensor shapes."""


class BackendError(VaecliError):
    """An attention backend or device is not available here."""


class OutputError(VaecliError):
    """An output cannot be written (exists without --overwrite, directory missing, disk full)."""


class OutOfMemory(VaecliError):
    """The device ran out of memory even after re-planning smaller."""


def printable(value: object) -> str:
    """`str(value)` with control characters, newlines and other unprintable characters escaped (`\\n`, `\\x1b`):
    names and values read from files reach the terminal only this way."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
