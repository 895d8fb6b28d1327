"""tqdm bars for mergelit's own long loops (Lightning draws the others), quiet where they would litter a log:
when stderr is not a terminal or the run is ``--quiet``."""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn mergelit's own bars on or off for this process (``--quiet`` turns them off)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled and sys.stderr.isatty()


def counter(total: int, desc: str, unit: str = "it", show: bool = True):
    """A bar updated by hand, drawn only where ``bar`` would be and ``show`` (e.g. on rank 0 alone)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (show and enabled()), dynamic_ncols=True)


def bar(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterable[T]:
    """``iterable`` with a transient progress bar (none when disabled or not on a terminal)."""
    if not enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
