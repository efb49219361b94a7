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
