"""The one exception family the command line reports as one ``error: ...`` line.

Every module raises its own subclass (``ConvertError``, ``ImageError``, ...); the CLI
layer (``cli.command``) catches ``UserError`` and turns it into one line on stderr and
its ``exit_code`` (2: bad input or a fault the user can mend).
"""

from __future__ import annotations


def one_line(message) -> str:
    """A message (or exception) on one line; an empty one is named by its type."""
    text = " ".join(str(message).split())
    return text or type(message).__name__


class UserError(Exception):
    """Bad input or an environment fault, told to the user in one line."""

    exit_code = 2


class OutputError(UserError, OSError):
    """An output cannot be written (read-only, full disk, not a folder...)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot write the output ({reason})")

    def __str__(self) -> str:
        return f"{self.path}: cannot write the output ({self.reason})"


class DamagedFileError(UserError, ValueError):
    """A model, adapter or checkpoint file is truncated, empty or has a broken header."""
