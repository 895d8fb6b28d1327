"""Result tables, plots and `mergelit compare`: cells equal the reports, best marked, runs labelled."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mergelit import tables
from mergelit.__main__ import main
from mergelit.report import make_report, write_report

TASKS = ["cola", "mrpc", "rte"]
PNG = b"\x89PNG\r\n\x1a\n"


def report(*accuracies: float) -> dict:
    return make_report({t: {"accuracy": a, "loss": 1.0 - a / 2} for t, a in zip(TASKS, accuracies)})


def cells(markdown: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of cell texts."""
    lines = [line for line in markdown.strip().splitlines()[2:]]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_markdown_and_csv_cells_equal_the_reports():
    rows = [tables.Row(["0.0"], report(0.5123456789, 0.25, 0.75)), tables.Row(["0.5"], report(0.6, 1 / 3, 0.7))]
    markdown = tables.markdown_table(rows, TASKS, ["λ"])
    assert markdown.splitlines()[0] == "| λ | cola | mrpc | rte | Avg. |"
    for row, line in zip(rows, cells(markdown)):
        assert line[0] == row.labels[0]
        for text, key in zip(line[1:], [*TASKS, "average"]):
            assert float(text) == pytest.approx(row.report[key]["accuracy"], abs=5e-7)  # six digits
    # CSV keeps full precision: the same floats as the reports.
    parsed = list(csv.DictReader(tables.csv_table(rows, TASKS, ["λ"]).splitlines()))
    for row, line in zip(rows, parsed):
        assert [float(line[k]) for k in [*TASKS, "average"]] == [row.report[k]["accuracy"] for k in [*TASKS, "average"]]


def test_percent_table_marks_the_best_of_each_column():
    rows = [tables.Row(["cola"], report(0.8, 0.5, 0.5)), tables.Row(["rte"], report(0.4, 0.6, 0.5))]
    markdown = tables.markdown_table(rows, TASKS, ["Model"], percent=True, mark_best=True)
    assert markdown.splitlines()[0] == "| Model | CoLA | MRPC | RTE | Avg. |"
    first, second = cells(markdown)
    assert first == ["CoLA", "**80.0**", "50.0", "**50.0**", "**60.0**"]  # ties are both bold
    assert second == ["RTE", "40.0", "**60.0**", "**50.0**", "50.0"]


def test_partial_reports_are_rejected_with_the_file_named(tmp_path):
    good = tmp_path / "good.json"
    write_report(report(0.5, 0.5, 0.5), good)
    assert tables.load_report(good, TASKS)["average"]["accuracy"] == 0.5
    missing = {k: v for k, v in report(0.5, 0.5, 0.5).items() if k != "rte"}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    (tmp_path / "nan.json").write_text(json.dumps({**report(0.5, 0.5, 0.5), "cola": {"accuracy": float("nan"), "loss": 1}}))
    (tmp_path / "cut.json").write_text(good.read_text()[:40])
    for name, reason in [("missing", "no 'rte' entry"), ("nan", "cola.accuracy"), ("cut", "not a complete")]:
        with pytest.raises(ValueError, match=reason) as error:
            tables.load_report(tmp_path / f"{name}.json", TASKS)
        assert f"{name}.json" in str(error.value)


def test_plots_are_png_files(tmp_path):
    rows = [tables.Row([str(x)], report(0.5 + x / 4, 0.6 - x / 5, 0.5)) for x in (0.0, 0.5, 1.0)]
    line = tables.plot_sweep(tmp_path / "line.png", [0.0, 0.5, 1.0], rows, TASKS, xlabel="λ", title="TA")
    heat = tables.plot_heatmap(tmp_path / "heat.png", rows, TASKS, title="7x7")
    for path in (line, heat):
        assert path.read_bytes()[:8] == PNG


def write_run(folder: Path, class_path: str, init_args: dict, rep: dict) -> Path:
    folder.mkdir(parents=True)
    write_report(rep, folder / "report.json")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": init_args}}))
    return folder


def write_sweep(folder: Path, points: dict[str, tuple[dict, dict, dict]]) -> Path:
    """A sweep folder as mergelit.sweep writes it: point reports and the manifest."""
    folder.mkdir(parents=True)
    manifest = {"tasks": TASKS, "points": {}}
    for name, (overrides, model, rep) in points.items():
        manifest["points"][name] = {"overrides": overrides, "model": model}
        write_report(rep, folder / f"{name}.json")
    (folder / tables.MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_compare_labels_runs_and_sweeps_and_marks_the_best(tmp_path, capsys):
    logs = tmp_path / "lightning_logs"
    ta = write_run(logs / "version_10", "mergelit.methods.TaskArithmetic", {"scaling_factor": 0.5}, report(0.7, 0.6, 0.5))
    write_run(logs / "version_2", "mergelit.methods.SimpleAverage", {}, report(0.6, 0.5, 0.4))
    individual = {
        f"task={t}": ({"model.init_args.task": t}, {"class_path": "mergelit.methods.Individual", "init_args": {"task": t}}, rep)
        for t, rep in zip(TASKS, [report(0.9, 0.3, 0.4), report(0.2, 0.8, 0.5), report(0.1, 0.1, 0.7)])
    }
    seven = write_sweep(tmp_path / "7x7", individual)
    ties = {
        f"scaling_factor={x}": (
            {"model.init_args.scaling_factor": x},
            {"class_path": "mergelit.methods.TiesMerging", "init_args": {"scaling_factor": x, "threshold": 20}},
            report(0.5 + x / 10, 0.5, 0.5 - x / 10 + (0.2 if x == 0.6 else 0)),
        )
        for x in (0.3, 0.6)
    }
    lam = write_sweep(tmp_path / "ties", ties)

    out = tmp_path / "compare"
    main(["compare", str(seven), str(logs), str(lam), str(ta / "report.json"), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    rows = cells((out / "table.md").read_text())
    assert (out / "table.md").read_text() in printed
    labels = [r[0] for r in rows]
    # The 7x7 sweep gives its diagonal; a folder of runs expands in version order; a λ sweep its best point.
    assert labels == [
        "Fine-tuned (individual)", "Simple Average", "Task Arithmetic (λ=0.5)", "TIES-Merging (λ=0.6), best of 2 (oracle)", "report",
    ]
    assert rows[0][1:4] == ["**90.0**", "**80.0**", "**70.0**"]
    assert rows[0][4] == "**80.0**"  # the diagonal's average
    assert rows[1][1:5] == ["60.0", "50.0", "40.0", "50.0"]  # then the cost and data columns
    parsed = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert parsed[3]["rte"] == repr(ties["scaling_factor=0.6"][2]["rte"]["accuracy"])
    assert (out / "plot.png").read_bytes()[:8] == PNG


def test_compare_refuses_runs_on_other_tasks_and_missing_paths(tmp_path):
    write_report(report(0.5, 0.5, 0.5), tmp_path / "a.json")
    write_report(make_report({"cola": {"accuracy": 0.5, "loss": 1.0}}), tmp_path / "b.json")
    with pytest.raises(ValueError, match="same tasks"):
        tables.compare([tmp_path / "a.json", tmp_path / "b.json"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tables.compare([tmp_path / "nowhere"])


def test_sweep_rows_give_each_method_its_selected_and_oracle_point(tmp_path):
    """A methods sweep folder: per method group its selected point (from selection.json, with the dev
    rows it read in the data column) and its oracle point; a group of one point is a plain row;
    without selection.json, one oracle row per group."""

    def spec(cls: str, **init_args) -> dict:
        return {"class_path": f"mergelit.methods.{cls}", "init_args": init_args}

    points = {
        "TaskArithmetic(scaling_factor=0.3)": ({"model": spec("TaskArithmetic", scaling_factor=0.3)}, spec("TaskArithmetic", scaling_factor=0.3), report(0.5, 0.5, 0.5)),
        "TaskArithmetic(scaling_factor=0.6)": ({"model": spec("TaskArithmetic", scaling_factor=0.6)}, spec("TaskArithmetic", scaling_factor=0.6), report(0.7, 0.5, 0.5)),
        "SimpleAverage": ({"model": spec("SimpleAverage")}, spec("SimpleAverage"), report(0.4, 0.4, 0.4)),
    }
    folder = write_sweep(tmp_path / "methods", points)
    manifest = json.loads((folder / tables.MANIFEST).read_text())
    for name, point in manifest["points"].items():
        point.update(group="Simple Average" if name == "SimpleAverage" else "Task Arithmetic", swept=[] if name == "SimpleAverage" else ["scaling_factor"])
    (folder / tables.MANIFEST).write_text(json.dumps(manifest))

    rows = tables.sweep_rows(folder)  # no selection: each method's best point, marked oracle
    assert [(r.labels[0], r.role) for r in rows] == [
        ("Task Arithmetic (λ=0.6), best of 2 (oracle)", "oracle"), ("Simple Average", "")]
    assert rows[0].data == "none + validation labels (oracle)"  # the oracle read the validation labels

    (folder / tables.SELECTION).write_text(json.dumps({
        "select_on": "dev", "data_read": "dev labels (validation rows)",
        "groups": {"Task Arithmetic": {"points": list(points)[:2], "selected": "TaskArithmetic(scaling_factor=0.3)"},
                   "Simple Average": {"points": ["SimpleAverage"], "selected": "SimpleAverage"}},
    }))
    rows = tables.sweep_rows(folder)
    assert [(r.labels[0], r.role) for r in rows] == [
        ("Task Arithmetic (λ=0.3), selected on dev (of 2)", "selected"),
        ("Task Arithmetic (λ=0.6), best of 2 (oracle)", "oracle"),
        ("Simple Average", ""),
    ]
    assert rows[0].data == "none + dev labels (validation rows)"  # what the choice read, beside the method's data
    assert rows[0].report["average"] == report(0.5, 0.5, 0.5)["average"]
    board = tables.compare([folder])
    assert "none + dev labels (validation rows)" in board and "none + validation labels (oracle)" in board
    # The selected point alone scored on validation (no oracle pass): the oracle row is left out.
    (folder / "TaskArithmetic(scaling_factor=0.6).json").unlink()
    assert [r.role for r in tables.sweep_rows(folder)] == ["selected", ""]
