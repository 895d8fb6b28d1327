"""The declared protocol: extra metrics (hand-computed), mnli_mismatched, predictions files, costs, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergelit import tables
from mergelit.__main__ import main
from mergelit.metrics import BinaryCounts, binary_metric, f1_score, matthews_corrcoef
from mergelit.report import EXTRA_ENTRIES, format_report, make_report
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# 8 examples, class 1 positive. labels / predictions:
LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 1, 0, 0, 0, 1, 1, 0]
# TP = 3 (rows 0, 1, 6), TN = 3 (rows 3, 4, 7), FP = 1 (row 5), FN = 1 (row 2).
# MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 − 1) / sqrt(4·4·4·4) = 8/16 = 0.5
# F1  = 2TP / (2TP + FP + FN) = 6 / 8 = 0.75
# Second case, all predicted 1 on labels [1, 0, 1]: TP 2, FP 1, FN 0, TN 0 -> F1 = 4/5; MCC has a
# zero factor (TN+FN = 0) and is 0 by convention.


def test_metrics_against_hand_computation():
    for name, expected in (("mcc", 0.5), ("f1", 0.75)):
        metric = BinaryCounts()
        metric.update(torch.tensor(PREDS[:5]), torch.tensor(LABELS[:5]))  # two batches: states are counts
        metric.update(torch.tensor(PREDS[5:]), torch.tensor(LABELS[5:]))
        assert metric.compute_metric(name) == pytest.approx(expected, abs=1e-12)
    f1 = BinaryCounts()
    f1.update(torch.tensor([1, 1, 1]), torch.tensor([1, 0, 1]))
    assert f1.compute_metric("f1") == pytest.approx(0.8, abs=1e-12)
    assert f1.compute_metric("mcc") == 0.0  # TN + FN = 0: a zero factor


# Degenerate cases, with the values GLUE's scorer (scikit-learn) gives: 0 wherever the denominator
# is 0, never an epsilon-smoothed number. (CoLA validation has 322 unacceptable / 721 acceptable rows.)
COLA_LABELS = [0] * 322 + [1] * 721
DEGENERATE = [
    # name, predictions, labels, MCC, F1
    ("all acceptable on CoLA", [1] * 1043, COLA_LABELS, 0.0, 2 * 721 / (2 * 721 + 322)),
    ("all unacceptable on CoLA", [0] * 1043, COLA_LABELS, 0.0, 0.0),
    ("MRPC all positive", [1] * 408, [0] * 129 + [1] * 279, 0.0, 2 * 279 / (2 * 279 + 129)),
    ("labels and predictions all 1", [1] * 10, [1] * 10, 0.0, 1.0),
    ("labels and predictions all 0", [0] * 10, [0] * 10, 0.0, 0.0),
    ("labels all 0, predictions mixed", [0, 1, 1, 0], [0, 0, 0, 0], 0.0, 0.0),
    ("labels all 1, predictions mixed", [0, 1, 1, 0], [1, 1, 1, 1], 0.0, 2 * 2 / (2 * 2 + 2)),
    ("perfect", [0, 1, 1, 0], [0, 1, 1, 0], 1.0, 1.0),
    ("exactly wrong", [1, 0, 0, 1], [0, 1, 1, 0], -1.0, 0.0),
]


@pytest.mark.parametrize("name, predicted, labels, mcc, f1", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_cases_follow_the_glue_scorer(name, predicted, labels, mcc, f1):
    counts = BinaryCounts()
    counts.update(torch.tensor(predicted), torch.tensor(labels))
    assert counts.compute_metric("mcc") == pytest.approx(mcc, abs=1e-15)
    assert counts.compute_metric("f1") == pytest.approx(f1, abs=1e-15)
    assert binary_metric("mcc", predicted, labels) == pytest.approx(mcc, abs=1e-15)
    rows = [{"idx": i, "label": y, "prediction": p, "logits": [0.0, 0.0]} for i, (y, p) in enumerate(zip(labels, predicted))]
    assert tables.score_predictions("cola", rows)["mcc"] == pytest.approx(mcc, abs=1e-15)  # re-scoring agrees
    assert tables.score_predictions("mrpc", rows)["f1"] == pytest.approx(f1, abs=1e-15)


def test_mcc_and_f1_formulas_on_counts():
    assert matthews_corrcoef(tp=3, fp=1, fn=1, tn=3) == 0.5
    assert matthews_corrcoef(tp=0, fp=0, fn=322, tn=0) == 0.0
    assert f1_score(tp=3, fp=1, fn=1) == 0.75
    assert f1_score(tp=0, fp=0, fn=0) == 0.0


def test_rescoring_prediction_rows_by_hand():
    logits = [[0.0, 1.0] if p else [1.0, 0.0] for p in PREDS]
    rows = [{"idx": i, "label": y, "prediction": p, "logits": z} for i, (y, p, z) in enumerate(zip(LABELS, PREDS, logits))]
    scored = tables.score_predictions("cola", rows)
    assert scored["accuracy"] == 6 / 8
    assert scored["mcc"] == pytest.approx(0.5, abs=1e-7)
    # every row's CE is log(1 + e) (right) or log(1 + e) + 1 - ... : compute it directly
    right, wrong = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    assert scored["loss"] == pytest.approx((6 * right + 2 * wrong) / 8, rel=1e-6)
    assert tables.score_predictions("mrpc", rows)["f1"] == pytest.approx(0.75, abs=1e-7)


def test_report_entries_and_table_columns():
    per_task = {t: {"accuracy": 0.5, "loss": 0.7} for t in TASKS}
    per_task["cola"]["mcc"] = 0.25
    report = make_report(per_task, {"mnli_mismatched": {"accuracy": 0.4, "loss": 1.0}}, {"kind": "merged"})
    assert list(report)[: len(TASKS) + 1] == [*TASKS, "average"]
    assert report["average"] == {"accuracy": 0.5, "loss": pytest.approx(0.7)}  # mismatched not averaged
    assert tables.report_tasks(report) == list(TASKS)
    tables.check_report(report)
    assert "MCC 25.00" in format_report(report) and "mnli_mismatched" in format_report(report)
    assert "MCC" not in format_report(report, extra_metrics=False)
    assert EXTRA_ENTRIES == {"mnli_mismatched": ("mnli", "validation_mismatched")}


def run(fixtures_root: Path, workdir: Path, devices: int = 1, *extra: str) -> dict:
    from test_distributed import run as run_test

    return run_test(fixtures_root, "task_arithmetic", workdir, devices, "--save_predictions", "true", *extra)


def test_end_to_end_predictions_rescore_exactly(fixtures_root, tmp_path):
    report = run(fixtures_root, tmp_path / "one")
    assert {"mcc"} <= set(report["cola"]) and {"f1"} <= set(report["mrpc"]) and {"f1"} <= set(report["qqp"])
    assert report["mnli_mismatched"]["accuracy"] >= 0
    protocol = report["protocol"]
    assert protocol["kind"] == "merged" and protocol["data"] == "none" and protocol["bodies_at_inference"] == 1
    assert protocol["splits"]["mnli"] == "validation_matched" and protocol["splits"]["mnli_mismatched"] == "validation_mismatched"
    assert protocol["metrics"]["cola"] == ["accuracy", "loss", "mcc"]
    costs = protocol["costs"]
    assert costs["merge_seconds"] > 0 and costs["merge_peak_gb"] >= 0 and costs["prepare_seconds"] >= 0

    folder = tmp_path / "one" / "predictions"
    rows = [json.loads(line) for line in (folder / "cola.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == sorted(r["idx"] for r in rows) and len(rows) == len({r["idx"] for r in rows})
    assert set(rows[0]) == {"idx", "label", "prediction", "logits", "loss"}
    rescored = tables.metrics_from_predictions(folder)
    for entry in [*TASKS, "mnli_mismatched"]:
        for metric, value in report[entry].items():
            if metric == "loss":
                # The report's loss mean is float32-accurate (its running state; see the report docstring).
                assert rescored[entry][metric] == pytest.approx(value, rel=1e-6), entry
            else:
                assert rescored[entry][metric] == value, (entry, metric)  # counts: exact
    assert rescored["average"]["accuracy"] == report["average"]["accuracy"]
    # The log dir gets the same files.
    logged = list((tmp_path / "one").glob("lightning_logs/version_*/predictions/cola.jsonl"))
    assert len(logged) == 1 and logged[0].read_text() == (folder / "cola.jsonl").read_text()


def test_extra_eval_splits_off(fixtures_root, tmp_path):
    report = run(fixtures_root, tmp_path / "off", 1, "--data.extra_eval_splits", "false")
    assert "mnli_mismatched" not in report and "mnli_mismatched" not in report["protocol"]["splits"]


def test_ddp_extra_metrics_and_predictions_equal_one_process(fixtures_root, tmp_path):
    single = run(fixtures_root, tmp_path / "one")
    distributed = run(fixtures_root, tmp_path / "two", 2)
    for entry in [*TASKS, "mnli_mismatched"]:
        for metric, value in single[entry].items():
            if metric == "loss":
                assert distributed[entry][metric] == pytest.approx(value, rel=1e-6)
            else:
                assert distributed[entry][metric] == value, (entry, metric)
    for entry in [*TASKS, "mnli_mismatched"]:
        one = [json.loads(x) for x in (tmp_path / "one" / "predictions" / f"{entry}.jsonl").read_text().splitlines()]
        two = [json.loads(x) for x in (tmp_path / "two" / "predictions" / f"{entry}.jsonl").read_text().splitlines()]
        assert [(r["idx"], r["label"], r["prediction"]) for r in one] == [(r["idx"], r["label"], r["prediction"]) for r in two]


def test_the_printed_table_drops_the_extra_column_on_request(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "pretrained.yaml"),
            "--trainer.enable_progress_bar", "false", "--report_save_path", str(tmp_path / "report.json")]
    main(args)
    assert "other metric (%)" in capsys.readouterr().out
    main([*args, "--extra_metrics", "false"])
    assert "other metric (%)" not in capsys.readouterr().out
    assert "mcc" in json.loads((tmp_path / "report.json").read_text())["cola"]  # the report keeps it
