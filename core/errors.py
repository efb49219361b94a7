"""Failures the user can fix: a command prints them as one `error: ...` line and exits with status 2.

Everything else (a bug) keeps its traceback. Subclasses of ValueError, so code that catches
ValueError, and tests that expect it, see them as before.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config value, a file, a store or a spec; the message names it and the nearest valid choice."""


class MismatchError(UserError):
    """Two things that must fit do not: a store and a model, a checkpoint and a model, two stores."""


class CorruptFileError(UserError):
    """A file's size or hash differs from what was recorded when it was written."""


class LockedError(UserError):
    """Another live process is writing the same run folder or store."""


class UnknownNameError(UserError, KeyError):
    """A name (size, encoder, array) that a table does not hold; a KeyError too, for callers that look names up."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateDictMismatch(MismatchError, KeyError):
    """A checkpoint whose keys or shapes are not the model's; a KeyError too, as a failed key lookup."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
