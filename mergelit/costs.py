"""What a run costs: wall time and peak memory of the ``load``, ``prepare`` and ``merge`` phases (docs/sweeps.md).

Measured code says which phase it is in (``with costs.phase("merge"):``); the caller that wants the figures
opens a record (``with costs.recording(record):``). A phase's peak is above the resident memory at its start
(Linux ``VmHWM`` after a reset, minus ``VmRSS``; elsewhere None); a phase entered again sums its times.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional


@dataclass
class PhaseCost:
    seconds: float = 0.0
    peak_gb: Optional[float] = None
    cached_seconds: float = 0.0  # what the cached parts cost when they were computed
    cached_peak_gb: Optional[float] = None
    cache_read_seconds: float = 0.0  # this run's time reading them
    cached: bool = False


class CostRecord:
    """The phases of one run (``phases[name]``), filled while the record is active."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseCost] = {}
        self._open: list[str] = []
        self._window_peak_kb = 0  # a peak that a ``measured`` block's reset cut out of the open phase's window

    def phase_cost(self, name: str) -> PhaseCost:
        return self.phases.setdefault(name, PhaseCost())

    def seconds(self, name: str) -> Optional[float]:
        return self.phases[name].seconds if name in self.phases else None

    def as_dict(self) -> dict[str, Any]:
        """The report's ``protocol.costs``: ``<phase>_seconds`` and ``<phase>_peak_gb``, and for a prepare phase
        read from a cache ``prepare_cached: true`` with its original figures (had nothing come from a cache)."""
        out: dict[str, Any] = {}
        for name in ("load", "prepare", "merge"):
            cost = self.phases.get(name)
            out[f"{name}_seconds"] = None if cost is None else cost.seconds
            if name != "load":
                out[f"{name}_peak_gb"] = None if cost is None else cost.peak_gb
        prepare = self.phases.get("prepare")
        out["prepare_cached"] = bool(prepare and prepare.cached)
        if prepare and prepare.cached:
            uncached = max(prepare.seconds - prepare.cache_read_seconds, 0.0)  # this run's time, less reading the cache
            out["prepare_original_seconds"] = uncached + prepare.cached_seconds
            peaks = [p for p in (prepare.peak_gb, prepare.cached_peak_gb) if p is not None]
            out["prepare_original_peak_gb"] = max(peaks) if peaks else None
        return out


_records: list[CostRecord] = []


def current() -> Optional[CostRecord]:
    """The innermost active record, or None."""
    return _records[-1] if _records else None


@contextlib.contextmanager
def recording(record: CostRecord) -> Iterator[CostRecord]:
    """Make ``record`` the one phases are written to, for the ``with`` block."""
    _records.append(record)
    try:
        yield record
    finally:
        _records.remove(record)


def _status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Start a new peak window: Linux resets VmHWM to the current RSS (``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block's wall time and peak memory to phase ``name`` of the active record (none: nothing).
    Inside another phase it only adds its time (the outer window's peak covers it)."""
    record = current()
    if record is None:
        yield
        return
    outer = bool(record._open)
    baseline = None if outer or not _reset_peak() else _status_kb("VmRSS")
    if not outer:
        record._window_peak_kb = 0
    loaded = record.seconds("load") or 0.0
    start = time.perf_counter()
    record._open.append(name)
    try:
        yield
    finally:
        record._open.pop()
        elapsed = time.perf_counter() - start
        if name != "load":  # reading weights is the load phase's, wherever it happens
            elapsed -= (record.seconds("load") or 0.0) - loaded
        cost = record.phase_cost(name)
        if name not in record._open:  # a phase re-entered inside itself is already being timed
            cost.seconds += max(elapsed, 0.0)
        peak = _status_kb("VmHWM") if baseline is not None else None
        if peak is not None:
            gb = max(max(peak, record._window_peak_kb) - baseline, 0) * 1024 / 1e9
            cost.peak_gb = gb if cost.peak_gb is None else max(cost.peak_gb, gb)


@contextlib.contextmanager
def measured() -> Iterator[PhaseCost]:
    """The block's ``seconds`` and ``peak_gb`` measured as ``phase`` would, returned for a cache to keep; inside an
    open phase, the phase's peak before the block and the block's own still count for the phase."""
    measure = PhaseCost()
    record = current()
    before_kb = _status_kb("VmHWM") if record is not None and record._open else None
    baseline = _status_kb("VmRSS") if _reset_peak() else None
    loaded = (record.seconds("load") or 0.0) if record is not None else 0.0
    start = time.perf_counter()
    try:
        yield measure
    finally:
        elapsed = time.perf_counter() - start
        if record is not None and "load" in record.phases:
            elapsed -= record.phases["load"].seconds - loaded
        measure.seconds = max(elapsed, 0.0)
        peak = _status_kb("VmHWM") if baseline is not None else None
        if peak is not None:
            measure.peak_gb = max(peak - baseline, 0) * 1024 / 1e9
        if before_kb is not None:
            record._window_peak_kb = max(record._window_peak_kb, before_kb, peak or 0)


def charge(name: str, seconds: float) -> None:
    """Add ``seconds`` to phase ``name`` of the active record (time measured by the caller)."""
    record = current()
    if record is not None:
        record.phase_cost(name).seconds += seconds


def note_cached(name: str, seconds: float, peak_gb: Optional[float], read_seconds: float) -> None:
    """Phase ``name`` took part of its result from a cache: that part originally cost ``seconds`` (peak
    ``peak_gb``); reading it took ``read_seconds`` of this run."""
    record = current()
    if record is None:
        return
    cost = record.phase_cost(name)
    cost.cached = True
    cost.cached_seconds += seconds
    cost.cache_read_seconds += read_seconds
    if peak_gb is not None:
        cost.cached_peak_gb = peak_gb if cost.cached_peak_gb is None else max(cost.cached_peak_gb, peak_gb)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Like ``phase`` but time only (no memory window): for short, frequent work such as one read."""
    start = time.perf_counter()
    try:
        yield
    finally:
        charge(name, time.perf_counter() - start)
