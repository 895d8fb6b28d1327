"""What a run costs (mergelit.costs): phases timed without the reads inside them, peaks above the
memory resident when the phase started, cached work reported with its original cost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mergelit import costs
from mergelit.__main__ import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(costs.time, "perf_counter", fake)
    return fake


def test_reads_inside_a_phase_are_charged_to_load(clock):
    record = costs.CostRecord()
    with costs.recording(record):
        with costs.phase("merge"):
            clock.now += 2.0
            with costs.timed("load"):  # reading weights inside the merge
                clock.now += 1.5
            clock.now += 0.5
        with costs.timed("load"):
            clock.now += 0.25
    assert record.seconds("merge") == 2.5
    assert record.seconds("load") == 1.75
    assert record.as_dict()["merge_seconds"] == 2.5 and record.as_dict()["load_seconds"] == 1.75


def test_a_phase_entered_again_inside_itself_is_counted_once(clock):
    record = costs.CostRecord()
    with costs.recording(record):
        with costs.phase("merge"):
            clock.now += 1.0
            with costs.phase("merge"):  # a task-aware body built inside setup's merge
                clock.now += 1.0
        with costs.phase("merge"):  # the next task's body, later
            clock.now += 3.0
    assert record.seconds("merge") == 5.0


def test_nothing_is_recorded_outside_a_record(clock):
    with costs.phase("merge"):
        clock.now += 1.0
    costs.charge("load", 3.0)
    costs.note_cached("prepare", 10.0, 1.0, 0.1)
    assert costs.current() is None


def test_cached_work_reports_its_original_cost(clock):
    record = costs.CostRecord()
    with costs.recording(record):
        with costs.phase("prepare"):
            clock.now += 1.25  # 1 s reading two cached results, 0.25 s computing a third
            costs.note_cached("prepare", seconds=11.0, peak_gb=2.5, read_seconds=0.5)
            costs.note_cached("prepare", seconds=12.0, peak_gb=3.0, read_seconds=0.5)
    values = record.as_dict()
    assert values["prepare_seconds"] == 1.25
    assert values["prepare_cached"] is True
    assert values["prepare_original_seconds"] == 0.25 + 11.0 + 12.0
    assert values["prepare_original_peak_gb"] == 3.0 or values["prepare_original_peak_gb"] > 3.0
    assert costs.CostRecord().as_dict()["prepare_cached"] is False


def fresh_pages(size: int):
    """``size`` bytes of new, touched memory: an anonymous map, never pages an allocator kept
    resident from earlier work (those would not raise the peak). ``close()`` returns them."""
    import mmap

    pages = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peaks are measured on Linux (VmHWM)")
def test_peaks_are_measured_above_the_memory_resident_at_the_start():
    record = costs.CostRecord()
    resident = fresh_pages(256 * 2**20)  # resident before either phase
    with costs.recording(record):
        with costs.phase("prepare"):
            fresh_pages(192 * 2**20).close()  # allocated inside the phase, then returned
        with costs.phase("merge"):
            small = torch.ones(1024)
    resident.close()
    del small
    assert 0.18 < record.phases["prepare"].peak_gb < 0.30  # the 0.2 GB block, not the 0.27 GB resident
    assert record.phases["merge"].peak_gb < 0.05


def test_a_report_holds_the_costs_of_each_phase(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "ties_merging.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(tmp_path / "report.json")])
    values = json.loads((tmp_path / "report.json").read_text())["protocol"]["costs"]
    assert values["load_seconds"] > 0 and values["merge_seconds"] > 0 and values["prepare_seconds"] >= 0
    assert values["prepare_cached"] is False
    if sys.platform.startswith("linux"):
        assert values["merge_peak_gb"] is not None and values["merge_peak_gb"] >= 0
