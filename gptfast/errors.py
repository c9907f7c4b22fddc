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


class InputError(UserError, ValueError):
    """A value the user gave is invalid: a flag, a config field, a prompt character, an argument
    of a public function. What gptfast raises on purpose instead of a bare ValueError."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class UsageError(InputError):
    """A bad command-line value or argument combination."""


class InputFileError(InputError):
    """A file the user named is unreadable, not UTF-8, empty or too short."""


class OutDirError(InputError):
    """An output directory that cannot hold a checkpoint (a file, not writable, ...)."""


class MissingDependencyError(UserError, RuntimeError):
    """An optional package a requested feature needs is not installed (matplotlib, triton, ...)."""


class NonFiniteError(InputError):
    """A model produced NaN / inf where a number was needed (logits): the checkpoint or the
    numerics (dtype) are at fault, not gptfast."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, corrupted, unsafe (a pickle asking for objects) or
    does not fit the request (a config gptfast cannot honour). One class for every format
    `gptfast.io` reads."""


class GGUFExportError(UserError, ValueError):
    """A model, tokenizer or argument GGUF / llama.cpp cannot take (the CLI prints it as one line)."""


class GGUFDependencyError(UserError, ImportError):
    """The `gguf` package is not installed."""


__all__ = ["CheckpointError", "GGUFDependencyError", "GGUFExportError", "InputError", "InputFileError",
           "MissingDependencyError", "MissingFileError", "NonFiniteError", "OutDirError", "UsageError",
           "UserError"]
