"""mergelit's user-mistake errors: what ``mergelit`` prints as one short line, without a traceback.

Every check of the user's input (config values, pool paths, checkpoints, data folders, method
arguments) raises a ``MergelitError``: a short message saying what was wrong (the value, the file
or the key) and what to do. ``mergelit.__main__`` prints ``mergelit: error: <message>`` and exits
with status 2; ``--debug`` (or ``MERGELIT_DEBUG=1``) shows the traceback. Any other exception is a
genuine internal error and keeps its traceback.

The classes also subclass the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations


class MergelitError(ValueError):
    """A user mistake: a bad config value, model, data folder or method argument."""

    def __str__(self) -> str:  # KeyError would repr() its message; keep it plain for every subclass
        return str(self.args[0]) if self.args else ""


class FileMissing(MergelitError, FileNotFoundError):
    """A path the user gave (checkpoint, data folder, config) does not exist or lacks a needed file."""


class KeyMissing(MergelitError, KeyError):
    """A name the user gave (task, split, column, tensor) is not there."""


class BadCheckpoint(MergelitError):
    """A checkpoint that cannot be used: pickle-only, corrupt, another architecture, non-finite weights."""


class BadData(MergelitError):
    """A data split that cannot be scored: labels out of range, empty split, rows too long."""


class NotWritable(MergelitError, PermissionError):
    """An output path (log dir, report, export folder, cache) that cannot be written."""


class MergeFailed(MergelitError):
    """A merge that cannot give a trustworthy body (non-finite tensor, ill-conditioned solve)."""
