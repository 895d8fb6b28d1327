"""Reports: FusionBench-compatible JSON files and the per-task table printed after a run.

Report format (accuracy as a fraction, loss = cross-entropy averaged over examples)::

    {"cola": {"accuracy": a, "loss": l}, ..., "average": {"accuracy": mean, "loss": mean}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

Report = dict[str, dict[str, float]]


def make_report(per_task: Mapping[str, Mapping[str, float]]) -> Report:
    """Add the ``average`` entry: the unweighted mean of the tasks' values."""
    report: Report = {task: {k: float(v) for k, v in values.items()} for task, values in per_task.items()}
    tasks = list(per_task)
    report["average"] = {
        key: sum(report[t][key] for t in tasks) / len(tasks) for key in ("accuracy", "loss")
    }
    return report


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_report(report: Report, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def read_report(path: str | os.PathLike) -> Report:
    with open(path) as f:
        return json.load(f)


def format_report(report: Report) -> str:
    """A markdown table: one row per task and the average, accuracy in percent."""
    lines = ["| task | accuracy (%) | loss |", "|---|---|---|"]
    for task, values in report.items():
        lines.append(f"| {task} | {100 * values['accuracy']:.2f} | {values['loss']:.4f} |")
    return "\n".join(lines)
