"""The leaderboard: every column for the methods that exist, the CSV twin, the cost plot."""

from __future__ import annotations

import csv
import io
import json

from mergelit import tables
from mergelit.methods import method_classes
from mergelit.report import make_report, write_report
from mergelit.tasks import TASKS, task_title

HEADERS = ["CoLA-MCC", "MRPC-F1", "QQP-F1", "MNLI-mm", "merge s", "peak GB", "prep s", "bodies", "data", "kind"]


def fake_report(i: int, cls) -> dict:
    per_task = {t: {"accuracy": 0.5 + i / 100, "loss": 0.7} for t in TASKS}
    per_task["cola"]["mcc"] = 0.1 * i
    per_task["mrpc"]["f1"] = 0.6
    per_task["qqp"]["f1"] = 0.5
    protocol = {"kind": cls.kind, "data": cls.data, "bodies_at_inference": 1.0 if cls.kind == "merged" else 7.0,
                "costs": {"merge_seconds": 0.5 * i if cls.kind != "ensemble" else None, "merge_peak_rss_gb": 1.25,
                          "prepare_seconds": 0.0}}
    return make_report(per_task, {"mnli_mismatched": {"accuracy": 0.45, "loss": 1.0}}, protocol)


def test_leaderboard_has_every_column_for_every_method(tmp_path):
    classes = [c for c in method_classes() if c.comparison]
    paths = []
    for i, cls in enumerate(classes):
        paths.append(write_report(fake_report(i, cls), tmp_path / "reports" / f"{cls.__name__}.json"))
    markdown = tables.compare(paths, tmp_path / "out")
    lines = markdown.splitlines()
    assert lines[0] == "| " + " | ".join(["Method", *(task_title(t) for t in TASKS), "Avg.", *HEADERS]) + " |"
    assert len(lines) == 2 + len(classes)
    for line, cls in zip(lines[2:], classes):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == cls.__name__ and len(cells) == 1 + len(TASKS) + 1 + len(HEADERS)
        assert cells[-1] == cls.kind and cells[-2] == cls.data and cells[-5] == "1.25"
    last = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert last[len(TASKS) + 2] == f"**{100 * 0.1 * (len(classes) - 1):.1f}**"  # best CoLA-MCC in bold
    assert (tmp_path / "out" / "table.md").read_text() == markdown
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    assert len(rows) == len(classes) and float(rows[0]["merge_peak_rss_gb"]) == 1.25
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0

    plain = tables.compare(paths, extra_metrics=False)
    assert "CoLA-MCC" not in plain and "merge s" in plain


def test_old_reports_without_protocol_or_extras_still_render(tmp_path):
    report = make_report({t: {"accuracy": 0.5, "loss": 0.7} for t in TASKS})
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    markdown = tables.compare([path])
    assert "CoLA-MCC" not in markdown  # no row has it: the column is left out
    assert markdown.splitlines()[2].endswith("| – | – | – | – | – | – |")
