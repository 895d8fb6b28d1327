"""`mergelit demo` end to end at the reduced size: data, pretraining, fine-tuning, every method, table; rerun reuses."""

from __future__ import annotations

import csv
import logging

import pytest

from mergelit.__main__ import main
from mergelit.demo import SIZES, thinned
from mergelit.methods import method_classes
from mergelit.tasks import TASKS

# The individual models, then every method meant for comparison, found by discovery (a new method
# file joins the demo by itself).
ROWS = ["Fine-tuned (individual)", *(cls.display_name for cls in method_classes() if cls.comparison)]


def test_demo_builds_merges_and_reuses_its_pool(tmp_path, monkeypatch, capsys, caplog):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    caplog.set_level(logging.INFO, logger="mergelit.demo")
    main(["demo", "--size", "small", "--output_dir", str(out)])
    printed = capsys.readouterr().out

    table = (out / "table.md").read_text()
    assert table in printed  # the table is printed, not only saved
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ROWS) and all(r["Method"].startswith(name) for r, name in zip(rows, ROWS))
    tuned = {cls.display_name: cls for cls in method_classes() if cls.comparison}
    for row, name in zip(rows[1:], ROWS[1:]):
        # The leaderboard: accuracy per task and average, the average's interval, normalized
        # accuracy, the gain over tuned Task Arithmetic, extra metrics, total cost, data and kind.
        assert list(row)[: len(TASKS) + 2] == ["Method", *TASKS, "average"]
        assert all(0.0 <= float(row[t]) <= 1.0 for t in [*TASKS, "average"])
        assert float(row["average_ci_low"]) <= float(row["average"]) <= float(row["average_ci_high"])
        assert float(row["normalized_accuracy"]) > 0 and row["gain"] != "" and float(row["total_cost_seconds"]) >= 0
        assert row["kind"] == tuned[name].kind
        if tuned[name].search:  # a method with a range: its point chosen on the dev rows
            (argument, values), = tuned[name].search.items()
            points = len(thinned(values, SIZES["small"].search_points))
            assert row["role"] == "selected" and f"selected on dev (of {points})" in row["Method"]
            assert "dev" in row["data"]
    ta = next(r for r in rows if r["Method"].startswith("Task Arithmetic"))
    assert float(ta["gain"]) == 0.0  # the gain is over tuned Task Arithmetic
    assert (out / "plot.png").stat().st_size > 0
    assert (out / "results" / "individual" / "table.md").is_file()  # the 7x7 cross-task table

    # The pool it built is an ordinary one: plain transformers loads every piece.
    pretrained = AutoModelForCausalLM.from_pretrained(out / "pool" / "pretrained")
    assert pretrained.config.n_layer >= 1
    for task in TASKS:
        model = AutoModelForSequenceClassification.from_pretrained(out / "pool" / task)
        assert model.config.pad_token_id == 50256

    # A rerun reuses the data and the pool (nothing rewritten) and evaluates again, to the same table.
    built = {p: p.stat().st_mtime_ns for p in (out / "pool").rglob("*.safetensors")}
    assert len(built) == 1 + len(TASKS)
    caplog.clear()
    main(["demo", "--size", "small", "--output_dir", str(out)])
    assert {p: p.stat().st_mtime_ns for p in (out / "pool").rglob("*.safetensors")} == built
    assert sum("reusing" in r.getMessage() for r in caplog.records) == 2 + len(TASKS)
    with open(out / "table.csv") as f:
        again = list(csv.DictReader(f))
    # The same numbers; only the measured costs (wall times, memory) differ from run to run.
    columns = ["Method", *TASKS, "average", "CoLA-MCC", "MRPC-F1", "QQP-F1", "MNLI-mm", "data", "kind"]
    assert [[r[c] for c in columns if c in r] for r in again] == [[r[c] for c in columns if c in r] for r in rows]


def test_unknown_size_is_refused(tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        main(["demo", "--size", "huge", "--output_dir", str(tmp_path / "demo")])
    assert "huge" in str(error.value) + capsys.readouterr().err
