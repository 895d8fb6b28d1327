"""mergelit's user-mistake errors, printed as one line (``mergelit: error: <message>``, status 2).

``--debug`` (or ``MERGELIT_DEBUG=1``) shows the traceback; any other exception is an internal error
and keeps it. Each class also subclasses the built-in a caller expects (``ValueError``, ``KeyError``).
"""

from __future__ import annotations

import math
from typing import Any


class MergelitError(ValueError):
    """A user mistake: a bad config value, model, data folder or method argument."""

    def __str__(self) -> str:  # KeyError would repr() its message; keep it plain for every subclass
        return str(self.args[0]) if self.args else ""


class FileMissing(MergelitError, FileNotFoundError):
    """A path the user gave (checkpoint, data folder, config) does not exist or lacks a needed file."""


class KeyMissing(MergelitError, KeyError):
    """A name the user gave (task, split, column, tensor) is not there."""


class DuplicateName(MergelitError):
    """A name given twice where each must be unique (a task in a pool, a key in a YAML mapping)."""


class BadCheckpoint(MergelitError):
    """A checkpoint that cannot be used: pickle-only, corrupt, another architecture, non-finite weights."""


class BadData(MergelitError):
    """A data split that cannot be scored: labels out of range, empty split, rows too long."""


class NotWritable(MergelitError, PermissionError):
    """An output path (log dir, report, export folder, cache) that cannot be written."""


class MergeFailed(MergelitError):
    """A merge that cannot give a trustworthy body (non-finite tensor, ill-conditioned solve)."""


# ---- argument checks shared by every method ---------------------------------------------------
def is_number(value: Any, finite: bool = False) -> bool:
    """``value`` is an int or float, not a bool (and with ``finite``, not NaN/inf): what a report or config may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def check_number(
    value: float, name: str, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False,
) -> float:
    """``value`` as a float, refusing a bool, a non-number, NaN/inf, or one outside [low, high]
    (an open end with ``low_open`` / ``high_open``); the message names ``name`` (``scaling_factor (λ)``)."""
    if low is not None and high is not None:
        where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        where = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        where = f" {'<' if high_open else '<='} {high:g}"
    else:
        where = ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise MergelitError(f"{name} must be a finite number{where}, got {value!r}.")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise MergelitError(f"{name} must be{where}, got {value!r}.")
    return float(value)


def check_integer(value: int, name: str, minimum: int | None = 0, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) within [minimum, maximum], else a short error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergelitError(f"{name} must be an integer, got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f">= {minimum}" if maximum is None
                  else f"in [{minimum}, {maximum}]" if minimum is not None else f"<= {maximum}")
        raise MergelitError(f"{name} must be an integer {bounds}, got {value!r}.")
    return value


def check_choice(value, name: str, choices) -> str:
    """``value`` if it is one of ``choices``, else a short error listing them."""
    if value not in tuple(choices):
        raise MergelitError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")
    return value
