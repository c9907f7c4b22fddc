"""Errors caused by the user's input, raised on purpose.

`gptfast.cli` prints a `UserError` as one line (`gptfast: error: ...`, exit status 2); any other
exception is a bug in gptfast and keeps its traceback, with a note on how to report it. The
subclasses also derive from `ValueError` so library callers that catch `ValueError` keep working.

This is a leaf module (imports nothing from gptfast) so every feature can raise these without
importing the CLI.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for (a file, a field, a flag): printed as one line."""


class UsageError(UserError, ValueError):
    """A bad command-line value or argument combination."""


class InputFileError(UserError, ValueError):
    """A file the user named is missing, unreadable, not UTF-8, empty or too short."""


class OutDirError(UserError, ValueError):
    """An output directory that cannot hold a checkpoint (a file, not writable, ...)."""


class NonFiniteError(UserError, ValueError):
    """A model produced NaN / inf where a number was needed (logits, loss)."""


__all__ = ["InputFileError", "NonFiniteError", "OutDirError", "UsageError", "UserError"]
