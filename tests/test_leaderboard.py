"""The leaderboard: every column for the methods that exist, the CSV twin, the cost plot; honest
costs (a cached prepare shows its original time); bootstrap intervals, paired win probability,
the gain over a reference and normalized accuracy."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from mergelit import tables, uncertainty
from mergelit.methods import method_classes
from mergelit.report import make_report, write_report
from mergelit.tasks import TASKS, task_title

HEADERS = ["Δ TA", "CoLA-MCC", "MRPC-F1", "QQP-F1", "MNLI-mm", "cost s", "load s", "prep GB", "merge GB", "bodies", "data", "kind"]


def fake_report(i: int, cls) -> dict:
    per_task = {t: {"accuracy": 0.5 + i / 100, "loss": 0.7} for t in TASKS}
    per_task["cola"]["mcc"] = 0.02 * i  # MCC stays in [-1, 1] for up to 50 methods
    per_task["mrpc"]["f1"] = 0.6
    per_task["qqp"]["f1"] = 0.5
    protocol = {"kind": cls.kind, "data": cls.data, "bodies_at_inference": 1.0 if cls.kind == "merged" else 7.0,
                "costs": {"load_seconds": 0.25, "prepare_seconds": 0.5, "prepare_peak_gb": 0.5, "prepare_cached": False,
                          "merge_seconds": 0.5 * i if cls.kind != "ensemble" else None, "merge_peak_gb": 1.25}}
    return make_report(per_task, {"mnli_mismatched": {"accuracy": 0.45, "loss": 1.0}}, protocol)


def cells_of(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_leaderboard_has_every_column_for_every_method(tmp_path):
    classes = [c for c in method_classes() if c.comparison]
    paths = []
    for i, cls in enumerate(classes):
        paths.append(write_report(fake_report(i, cls), tmp_path / "reports" / f"{cls.__name__}.json"))
    markdown = tables.compare(paths, tmp_path / "out")
    lines = markdown.splitlines()
    # The gain over Task Arithmetic: its row is found by name (these reports predate class paths).
    assert lines[0] == "| " + " | ".join(["Method", *(task_title(t) for t in TASKS), "Avg.", *HEADERS]) + " |"
    assert len(lines) == 2 + len(classes)  # no notes: nothing cached, no per-example results
    for i, (line, cls) in enumerate(zip(lines[2:], classes)):
        cells = cells_of(line)
        assert cells[0] == cls.__name__ and len(cells) == 1 + len(TASKS) + 1 + len(HEADERS)
        assert cells[-1] == cls.kind and cells[-2] == cls.data and cells[-4] == "1.25" and cells[-5] == "0.50"
        total = 0.5 + (0.5 * i if cls.kind != "ensemble" else 0.0)  # prepare + merge
        assert cells[-7] == tables._seconds(total) and cells[-6] == "0.25"  # load apart from the total
    last = cells_of(lines[-1])
    assert last[len(TASKS) + 3] == f"**{100 * 0.02 * (len(classes) - 1):.1f}**"  # best CoLA-MCC in bold
    assert (tmp_path / "out" / "table.md").read_text() == markdown
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    assert len(rows) == len(classes) and float(rows[0]["merge_peak_gb"]) == 1.25
    assert float(rows[1]["total_cost_seconds"]) == 1.0 and float(rows[1]["load_seconds"]) == 0.25
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0

    plain = tables.compare(paths, extra_metrics=False)
    assert "CoLA-MCC" not in plain and "cost s" in plain


def test_old_reports_without_protocol_or_extras_still_render(tmp_path):
    report = make_report({t: {"accuracy": 0.5, "loss": 0.7} for t in TASKS})
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    markdown = tables.compare([path])
    assert "CoLA-MCC" not in markdown and "95% CI" not in markdown  # no row has them: left out
    assert markdown.splitlines()[2].endswith("| – | – | – | – | – | – | – |")


def test_a_cached_prepare_shows_its_original_seconds(tmp_path):
    """A run whose statistics came from a cache costs what computing them cost (marked †), not the
    second it took to read them; the plot's x axis is that total."""
    costs = {"load_seconds": 0.4, "prepare_seconds": 1.2, "prepare_peak_gb": 0.01, "prepare_cached": True,
             "prepare_original_seconds": 23.7, "prepare_original_peak_gb": 0.8, "merge_seconds": 0.3, "merge_peak_gb": 0.5}
    report = make_report({t: {"accuracy": 0.6, "loss": 0.7} for t in TASKS}, protocol={"kind": "merged", "data": "train inputs",
                                                                                        "costs": costs})
    path = write_report(report, tmp_path / "fisher.json")
    assert tables.total_cost(report) == pytest.approx(24.0)
    markdown = tables.compare([path], tmp_path / "out")
    headers, cells = cells_of(markdown.splitlines()[0]), cells_of(markdown.splitlines()[2])
    assert cells[headers.index("cost s")] == "24†" and cells[headers.index("prep GB")] == "0.80"
    assert cells[headers.index("load s")] == "0.40" and cells[headers.index("merge GB")] == "0.50"
    assert "† prepare read from a cache" in markdown
    (row,) = csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text()))
    assert float(row["total_cost_seconds"]) == pytest.approx(24.0) and row["prepare_cached"] == "True"
    assert float(row["prepare_seconds"]) == 1.2 and float(row["prepare_original_seconds"]) == 23.7


# ---- uncertainty -------------------------------------------------------------------------------
def predictions(accuracy: float, n: int, seed: int) -> list[dict]:
    """Prediction rows (idx, label, prediction) with about ``accuracy`` of them right, from a seed."""
    generator = torch.Generator().manual_seed(seed)
    right = (torch.rand(n, generator=generator) < accuracy).tolist()
    labels = torch.randint(2, (n,), generator=generator).tolist()
    return [{"idx": i, "label": y, "prediction": y if ok else 1 - y} for i, (y, ok) in enumerate(zip(labels, right))]


def report_of(rows_per_task: dict[str, list[dict]], method: str = "mergelit.methods.task_arithmetic.TaskArithmetic") -> dict:
    per_example = {t: uncertainty.encode_correct(rows) for t, rows in rows_per_task.items()}
    per_task = {t: {"accuracy": sum(r["label"] == r["prediction"] for r in rows) / len(rows), "loss": 0.5}
                for t, rows in rows_per_task.items()}
    protocol = {"class_path": method, "per_example": per_example,
                "uncertainty": uncertainty.uncertainty_entry(per_example, list(rows_per_task))}
    return make_report(per_task, protocol=protocol)


def test_bootstrap_interval_of_a_fixed_predictions_file_is_reproducible_and_holds_the_estimate(tmp_path):
    rows = {"cola": predictions(0.7, 300, 1), "rte": predictions(0.55, 120, 2)}
    path = tmp_path / "predictions"
    path.mkdir()
    for task, task_rows in rows.items():
        (path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    from mergelit.report import read_predictions

    read = read_predictions(path)
    correct = {t: uncertainty.decode_correct(uncertainty.encode_correct(read[t])) for t in ("cola", "rte")}
    assert correct["rte"].tolist() == [r["label"] == r["prediction"] for r in rows["rte"]]  # stored exactly
    first = uncertainty.intervals(correct)
    assert uncertainty.intervals(correct) == first  # seeded: the same interval every time
    accuracy = {t: correct[t].double().mean().item() for t in correct}
    accuracy["average"] = sum(accuracy.values()) / 2
    for entry, (low, high) in first.items():
        assert low < accuracy[entry] < high and high - low < 0.25
    # The average's resamples are the mean of the tasks' resamples of the same draws.
    draws = uncertainty.bootstrap(correct)
    assert torch.equal(draws["average"], (draws["cola"] + draws["rte"]) / 2)
    # A task's interval (for binomial data) is about ±1.96 standard errors wide.
    p, n = accuracy["cola"], 300
    assert first["cola"][1] - first["cola"][0] == pytest.approx(2 * 1.96 * (p * (1 - p) / n) ** 0.5, rel=0.15)
    assert uncertainty.intervals(correct, seed=1) != first  # the seed is what makes it reproducible


def test_paired_win_probability_gain_and_normalized_accuracy(tmp_path):
    """Two runs on the same rows are compared on the same resamples: a run that is right wherever the
    reference is (and on a few rows more) wins in every resample; the reference itself shows "ref"."""
    base = {"cola": predictions(0.6, 200, 3), "rte": predictions(0.6, 100, 4)}
    better = {t: [dict(r, prediction=r["label"]) if r["idx"] % 10 == 0 else r for r in rows] for t, rows in base.items()}
    expert = {t: [dict(r, prediction=r["label"]) for r in rows] for t, rows in base.items()}  # all right: 100 %
    write_report(report_of(base), tmp_path / "ta.json")
    write_report(report_of(better, "mergelit.methods.ties.TiesMerging"), tmp_path / "ties.json")
    draws = {name: uncertainty.bootstrap({t: uncertainty.decode_correct(uncertainty.encode_correct(rows))
                                          for t, rows in runs.items()}) for name, runs in (("base", base), ("better", better))}
    assert uncertainty.win_probability(draws["better"], draws["base"]) == 1.0
    assert uncertainty.win_probability(draws["base"], draws["better"]) == 0.0
    assert uncertainty.win_probability(draws["base"], draws["base"]) == 0.5  # ties count one half

    rows = [tables.Row(["TA"], report_of(base)), tables.Row(["TIES"], report_of(better, "mergelit.methods.ties.TiesMerging")),
            tables.Row(["Fine-tuned (individual)"], report_of(expert, "mergelit.methods.individual.Individual"), role="individual")]
    board = tables.Leaderboard(rows, ["cola", "rte"])
    lines = board.markdown().splitlines()
    headers = cells_of(lines[0])
    ta, ties, individual = (cells_of(line) for line in lines[2:5])
    assert headers[headers.index("Avg.") + 1 : headers.index("Avg.") + 5] == ["Avg. 95% CI", "Norm.", "Δ TA", "P(win) vs TA"]
    assert ta[headers.index("Δ TA")] == "ref" and ta[headers.index("P(win) vs TA")] == "ref"
    gain = rows[1].report["average"]["accuracy"] - rows[0].report["average"]["accuracy"]
    assert ties[headers.index("Δ TA")] == f"{100 * gain:+.1f}" and ties[headers.index("P(win) vs TA")] == "1.00"
    assert individual[headers.index("Norm.")] == "100.0"
    expected = sum(rows[0].report[t]["accuracy"] / 1.0 for t in ("cola", "rte")) / 2
    assert ta[headers.index("Norm.")] == f"{100 * expected:.1f}"
    low, high = rows[1].report["protocol"]["uncertainty"]["accuracy"]["average"]
    assert ties[headers.index("Avg. 95% CI")] == f"{100 * low:.1f}–{100 * high:.1f}"
    # --against names another reference; one that no row is fails, naming the rows.
    against = tables.compare([tmp_path / "ta.json", tmp_path / "ties.json"], against="ties_merging")
    assert "Δ TIES-Merging" in against.splitlines()[0]
    with pytest.raises(ValueError, match="--against wudi: no row"):
        tables.compare([tmp_path / "ta.json"], against="wudi")
