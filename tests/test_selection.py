"""Selection without the reported labels: the dev split (a seeded fraction of validation, held out
of scoring; or train rows, disjoint from the statistics rows), the label-free agreement
criterion, `mergelit sweep --sweep.select_on dev|agreement` (every point on the dev rows, the
selection step's selection.json, only the selected point on validation, equal to a plain run;
`--sweep.oracle true` for the oracle rows), a methods sweep with a range per method, and
`compare` using the selected points."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import yaml

from mergelit import statistics, tables
from mergelit.__main__ import main
from mergelit.glue import GLUEDataModule
from mergelit.methods.individual import Individual
from mergelit.methods.task_arithmetic import TaskArithmetic
from mergelit.pool import ModelPool
from mergelit.selection import CriterionScorer, select
from mergelit.tasks import GLUE_TASKS
from mergelit.statistics import draw_examples, read_statistics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GRID = json.dumps({"model.init_args.scaling_factor": [0.0, 0.5, 1.0]})


def two_tasks(fixtures_root: Path, data_path: Path | None = None, **data_kwargs) -> tuple[ModelPool, GLUEDataModule]:
    config = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    tasks = ["rte", "sst2"]
    pool = ModelPool(config["pool"]["pretrained"], {t: config["pool"]["finetuned"][t] for t in tasks}, config["pool"].get("tokenizer"))
    data = GLUEDataModule(tasks=tasks, tokenizer=pool.tokenizer_path, path=str(data_path or config["data"]["path"]),
                          cache_dir=None, **data_kwargs)
    return pool, data


def relabelled_copy(source: Path, target: Path, split: str, how: str, rows=None) -> Path:
    """A copy of the GLUE folder whose ``split`` labels (every validation split for ``validation``;
    only the row numbers ``rows(task, split, n)`` gives, if given) are permuted among themselves
    (``how="permute"``) or each moved to the next class (``"flip"``)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        splits = datasets.load_from_disk(str(folder))
        for name in [s for s in splits if s == split or (split == "validation" and s.startswith("validation"))]:
            labels = list(splits[name]["label"])
            chosen = sorted(rows(folder.name, name, len(labels))) if rows else list(range(len(labels)))
            if how == "permute":
                order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(123)).tolist()
                values = [labels[chosen[i]] for i in order]
            else:
                count = len(GLUE_TASKS[folder.name].label_names)
                values = [(labels[i] + 1) % count for i in chosen]
            for i, value in zip(chosen, values):
                labels[i] = value
            splits[name] = splits[name].remove_columns("label").add_column("label", labels).cast(splits[name].features)
        splits.save_to_disk(str(target / folder.name))
    return target


# ---- the dev split ---------------------------------------------------------------------------
def test_train_dev_split_is_seeded_capped_and_the_train_rows(fixtures_root):
    _, data = two_tasks(fixtures_root, dev_source="train")
    n = len(data.train_dataset("rte"))
    dev = data.dev_indices("rte")
    assert data.dev_split("rte") == "train"
    assert len(dev) == min(500, n // 2) and dev == sorted(set(dev))  # half of a small split, no repeats
    assert dev == two_tasks(fixtures_root, dev_source="train")[1].dev_indices("rte")  # seeded: the same rows every time
    assert dev != two_tasks(fixtures_root, dev_source="train", dev_seed=1)[1].dev_indices("rte")
    assert len(two_tasks(fixtures_root, dev_source="train", dev_size=10)[1].dev_indices("rte")) == 10
    rows = data.dev_dataset("rte")
    assert rows["input_ids"] == data.train_dataset("rte").select(dev)["input_ids"]
    assert rows["label"] == data.train_dataset("rte").select(dev)["label"]  # labeled
    assert data.statistics_excluded("rte") == []  # statistics untouched unless hold_out_dev
    assert two_tasks(fixtures_root, dev_source="train", hold_out_dev=True)[1].statistics_excluded("rte") == dev
    with pytest.raises(ValueError, match="dev_size"):
        GLUEDataModule(tasks=["rte"], dev_size=-1)
    with pytest.raises(ValueError, match="hold_out_dev"):
        GLUEDataModule(tasks=["rte"], dev_source="train", dev_size=0, hold_out_dev=True)
    for fraction in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dev_fraction"):
            GLUEDataModule(tasks=["rte"], dev_fraction=fraction)


def test_validation_dev_rows_are_never_scored(fixtures_root):
    """``dev_source: validation`` (the default): a seeded 10 % of each validation split; under
    ``hold_out_dev`` the test loaders score exactly the other rows (index sets disjoint, together
    the whole split), statistics draw from train as before, and the report says what was held out."""
    _, plain = two_tasks(fixtures_root)
    _, data = two_tasks(fixtures_root, hold_out_dev=True)
    for task in ("rte", "sst2"):
        split = GLUE_TASKS[task].eval_split
        n = len(data.raw(task, split))
        dev = data.dev_indices(task)
        assert data.dev_split(task) == split and len(dev) == int(0.1 * n) and dev == sorted(set(dev))
        assert dev == two_tasks(fixtures_root, dev_seed=0)[1].dev_indices(task) != two_tasks(fixtures_root, dev_seed=5)[1].dev_indices(task)
        assert data.held_out_rows(task, split) == dev and data.statistics_excluded(task) == []
        assert plain.held_out_rows(task, split) == []  # nothing held out without hold_out_dev
        dev_ids = set(data.eval_dataset(task).select(dev)["idx"])
        scored_ids = [i for batch in data.eval_dataloader(task) for i in batch["idx"].tolist()]
        assert len(scored_ids) == len(set(scored_ids)) == n - len(dev)
        assert not dev_ids & set(scored_ids)  # disjoint
        assert dev_ids | set(scored_ids) == set(data.eval_dataset(task)["idx"])  # together: the split
        assert sorted(i for batch in plain.eval_dataloader(task) for i in batch["idx"].tolist()) == sorted(data.eval_dataset(task)["idx"])
        assert data.dev_dataset(task)["label"] == data.eval_dataset(task).select(dev)["label"]
    record = data.evaluation_record()
    assert record["tasks"]["rte"] == {"split": "validation", "rows": 61, "held_out": 6, "scored": 55,
                                      "held_out_sha256": record["tasks"]["rte"]["held_out_sha256"]}
    assert plain.evaluation_record() is None


def test_draw_examples_skips_excluded_rows_in_the_same_order():
    plain = draw_examples(100, 30, seed=7)
    assert draw_examples(100, 30, seed=7, exclude=()) == plain  # no dev split: the draw of before
    held_out = set(plain[::3])
    drawn = draw_examples(100, 30, seed=7, exclude=sorted(held_out))
    assert len(drawn) == 30 and not held_out & set(drawn)
    full = draw_examples(100, 100, seed=7)
    assert drawn == [i for i in full if i not in held_out][:30]  # the same permutation, dev rows dropped


def test_statistics_rows_are_disjoint_from_the_train_dev_rows_under_hold_out_dev(fixtures_root, tmp_path):
    pool, data = two_tasks(fixtures_root, dev_source="train", hold_out_dev=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    statistics.gram_statistics(trainer, data, pool, num_examples=32, batch_size=16, seed=1, count_padding=False, cache_dir=tmp_path)
    for task in pool.tasks:
        path = next((tmp_path / "regmean").glob(f"{task}-*.safetensors"))
        indices = json.loads(read_statistics(path)[1]["indices"])  # recorded beside the statistics
        dev = data.dev_indices(task)
        assert len(indices) == 32 and not set(indices) & set(dev)  # disjoint
        assert indices == draw_examples(len(data.train_dataset(task)), 32, 1, exclude=dev)


# ---- the criteria ----------------------------------------------------------------------------
def test_agreement_reads_no_labels_and_dev_accuracy_does(fixtures_root, tmp_path):
    pool, data = two_tasks(fixtures_root)
    flipped_pool, flipped = two_tasks(fixtures_root, relabelled_copy(Path(data.path), tmp_path / "glue", "validation", "flip"))
    method = TaskArithmetic(pool, scaling_factor=0.5)
    agreement = CriterionScorer("agreement").score(method, data)
    # Every validation label (so every dev label) changed: agreement is the same to the bit ...
    assert CriterionScorer("agreement").score(TaskArithmetic(flipped_pool, scaling_factor=0.5), flipped) == agreement
    # ... while dev accuracy, which reads them, moves.
    dev = CriterionScorer("dev").score(method, data)
    assert CriterionScorer("dev").score(TaskArithmetic(flipped_pool, scaling_factor=0.5), flipped)["value"] != dev["value"]
    assert 0.0 <= agreement["value"] <= 1.0 and set(agreement["per_task"]) == {"rte", "sst2"}
    # Expert t agrees with itself on task t.
    assert CriterionScorer("agreement").score(Individual(pool, task="rte"), data)["per_task"]["rte"] == 1.0


def test_select_takes_the_highest_value_and_the_first_of_ties():
    assert select(["a", "b", "c"], {"a": 0.2, "b": 0.7, "c": 0.7}) == "b"
    assert select(["a", "b"], {"a": 0.5, "b": 0.5}) == "a"


# ---- the sweep -------------------------------------------------------------------------------
def run_sweep(fixtures_root: Path, out: Path, select_on: str, *extra: str, grid: str | None = GRID) -> dict:
    args = ["sweep", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
            "-c", str(CONFIGS / "sweeps" / "scaling_factor.yaml"), "--sweep.select_on", select_on, "--output_dir", str(out),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra]
    if grid:
        args += ["--sweep.grid", grid]
    main(args)
    return json.loads((out / "sweep.json").read_text())


def without_costs(report: dict) -> dict:
    del report["protocol"]["costs"]  # measured wall times and memory differ from run to run
    return report


def test_a_selecting_sweep_scores_only_the_selected_point_on_validation(fixtures_root, tmp_path, monkeypatch):
    """Every point on the dev rows, the choice from the criterion files alone (selection.json), then
    one validation run: the selected point's, whose report equals a plain `mergelit test` of it.
    A rerun into the folder scores nothing."""
    import mergelit.sweep as sweep_module

    monkeypatch.chdir(tmp_path)
    tests = []
    original = sweep_module.run_test
    monkeypatch.setattr(sweep_module, "run_test", lambda *a, **k: tests.append(1) or original(*a, **k))
    out = tmp_path / "sweep"
    manifest = run_sweep(fixtures_root, out, "dev")
    points = list(manifest["points"])
    picked = json.loads((out / "selection.json").read_text())
    criterion = {p: json.loads((out / f"{p}.criterion.json").read_text())["value"] for p in points}
    assert picked["criterion"] == criterion and picked["select_on"] == "dev"
    chosen = select(points, criterion)  # the argmax of the criterion values alone
    assert picked["selected_points"] == [chosen] and picked["groups"][""] == {"points": points, "selected": chosen}
    assert picked["labels_used"] == "dev labels (validation rows)"
    assert picked["dev"]["source"] == "validation" and picked["dev"]["rows"] == {t: 6 for t in manifest["tasks"]}
    assert manifest["config"]["data.hold_out_dev"] is True
    assert tests == [1] and sorted(p.name for p in out.glob("scaling_factor=*[0-9].json")) == [f"{chosen}.json"]
    table = (out / "table.md").read_text()
    assert f"**selected** on dev: {chosen}" in table and "oracle" not in table

    value = manifest["points"][chosen]["overrides"]["model.init_args.scaling_factor"]
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
          "--model.init_args.scaling_factor", str(value), "--data.hold_out_dev", "true",
          "--report_save_path", str(tmp_path / "plain.json"), "--trainer.enable_progress_bar", "false"])
    selected = json.loads((out / f"{chosen}.json").read_text())
    assert without_costs(selected) == without_costs(json.loads((tmp_path / "plain.json").read_text()))
    assert selected["protocol"]["evaluation"]["tasks"]["rte"]["scored"] == 55  # the report says which rows
    assert "selection" not in selected["protocol"]  # the choice lives in selection.json, not in the report

    tests.clear()
    before = {p: (out / f"{p}.criterion.json").stat().st_mtime_ns for p in points}
    run_sweep(fixtures_root, out, "dev")  # resumed: everything is done
    assert tests == [] and before == {p: (out / f"{p}.criterion.json").stat().st_mtime_ns for p in points}
    assert ", selected on dev (of 3)" in tables.compare([out])


def test_agreement_on_train_rows_with_the_oracle_shows_both_rows_and_says_in_sample(fixtures_root, tmp_path):
    """``dev_source: train`` stays available: every validation row is scored, the statistics would
    skip the dev rows, and the tables call the choice in-sample for the experts. With the oracle
    every point is scored on validation: a selected and an oracle row."""
    out = tmp_path / "sweep"
    manifest = run_sweep(fixtures_root, out, "agreement", "--sweep.oracle", "true", "--data.dev_source", "train")
    points = list(manifest["points"])
    picked = json.loads((out / "selection.json").read_text())
    chosen = picked["selected_points"][0]
    assert picked["labels_used"] == "none" and chosen == select(points, picked["criterion"])
    assert picked["dev"]["source"] == "train" and picked["dev"]["rows"] == {t: 48 for t in manifest["tasks"]}  # 96 // 2
    reports = {p: tables.load_report(out / f"{p}.json", manifest["tasks"]) for p in points}  # all scored
    assert all("evaluation" not in r["protocol"] for r in reports.values())  # no validation row held out
    assert all(r["protocol"]["per_example"]["rte"]["rows"] == 61 for r in reports.values())
    table = (out / "table.md").read_text()
    assert f"**selected** on agreement, in-sample for the experts: {chosen}" in table and "**oracle** (best of 3)" in table
    assert table.splitlines()[0].split("|")[2].strip() == "agreement"
    oracle = max(points, key=lambda p: reports[p]["average"]["accuracy"])
    rows = tables.collect_rows([out])
    assert [(r.role, r.report) for r in rows] == [("selected", reports[chosen]), ("oracle", reports[oracle])]
    assert rows[0].labels[0].endswith(", selected on agreement, in-sample for the experts (of 3)")
    assert rows[0].data == "none + dev inputs (train rows, in-sample for the experts)"
    assert rows[1].data == "none + validation labels (oracle)"


def test_permuting_the_held_out_rows_labels_changes_nothing_else(fixtures_root, tmp_path, monkeypatch):
    """The dev rows' labels feed the dev criterion only: with them permuted among the classes the
    validation report (scored on the other rows) is the same, the criterion is not."""
    monkeypatch.chdir(tmp_path)
    glue = Path(yaml.safe_load((fixtures_root / "config.yaml").read_text())["data"]["path"])
    _, data = two_tasks(fixtures_root)
    held_out = relabelled_copy(glue, tmp_path / "glue", "validation", "flip",
                               rows=lambda task, split, n: data.dev_indices(task) if split == GLUE_TASKS[task].eval_split else [])
    reports = []
    for path in (glue, held_out):
        main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
              "--data.path", str(path), "--data.hold_out_dev", "true", "--report_save_path", str(tmp_path / f"{path.name}.json"),
              "--trainer.enable_progress_bar", "false"])
        reports.append(without_costs(json.loads((tmp_path / f"{path.name}.json").read_text())))
    assert reports[0] == reports[1]
    pool, original = two_tasks(fixtures_root)
    pool_b, changed = two_tasks(fixtures_root, held_out)
    assert CriterionScorer("dev").score(TaskArithmetic(pool, scaling_factor=0.5), original)["value"] != \
        CriterionScorer("dev").score(TaskArithmetic(pool_b, scaling_factor=0.5), changed)["value"]


def test_permuting_the_scored_rows_labels_leaves_the_selection_unchanged(fixtures_root, tmp_path):
    glue = Path(yaml.safe_load((fixtures_root / "config.yaml").read_text())["data"]["path"])
    _, data = two_tasks(fixtures_root)
    dev = set(data.dev_indices("rte"))  # every split has 61 rows: the same dev rows in each
    permuted = relabelled_copy(glue, tmp_path / "glue", "validation", "permute",
                               rows=lambda task, split, n: [i for i in range(n) if i not in dev or split != GLUE_TASKS[task].eval_split])
    run_sweep(fixtures_root, tmp_path / "a", "dev")
    run_sweep(fixtures_root, tmp_path / "b", "dev", "--data.path", str(permuted))
    first, second = (json.loads((tmp_path / n / "selection.json").read_text()) for n in ("a", "b"))
    assert second["selected_points"] == first["selected_points"] and second["criterion"] == first["criterion"]
    assert second["dev"] == first["dev"]
    # ... while the validation numbers (what is reported) did change.
    name = first["selected_points"][0]
    assert json.loads((tmp_path / "a" / f"{name}.json").read_text())["average"] != json.loads(
        (tmp_path / "b" / f"{name}.json").read_text())["average"]


def test_select_on_none_keeps_todays_sweep(fixtures_root, tmp_path):
    out = tmp_path / "none"
    manifest = run_sweep(fixtures_root, out, "none")
    assert manifest["config"]["data.hold_out_dev"] is False
    assert not (out / "selection.json").exists() and not list(out.glob("*.criterion.json"))
    assert "selected" not in (out / "table.md").read_text()
    assert ", best of 3 (oracle)" in tables.compare([out])


def test_resuming_a_plain_sweep_with_selection_scores_only_the_criterion(fixtures_root, tmp_path, monkeypatch, capsys):
    # hold_out_dev is part of the config: a plain sweep's folder is another config ...
    out = tmp_path / "s"
    run_sweep(fixtures_root, out, "none")
    with pytest.raises(SystemExit):
        run_sweep(fixtures_root, out, "dev")
    assert "data.hold_out_dev" in capsys.readouterr().err
    # ... unless the plain sweep held the dev rows out already: then only the criterion runs.
    out = tmp_path / "t"
    run_sweep(fixtures_root, out, "none", "--data.hold_out_dev", "true")
    import mergelit.sweep as sweep_module

    tests = []
    original = sweep_module.run_test
    monkeypatch.setattr(sweep_module, "run_test", lambda *a, **k: tests.append(1) or original(*a, **k))
    manifest = run_sweep(fixtures_root, out, "agreement")
    assert tests == [] and set(json.loads((out / "selection.json").read_text())["criterion"]) == set(manifest["points"])


def test_a_methods_sweep_gives_each_method_its_selected_and_oracle_rows(fixtures_root, tmp_path, monkeypatch):
    """`compare -c` over three methods, each with its own range (and one without): per method a
    selected and an oracle row, the gain over tuned Task Arithmetic (selected vs selected) and the
    dev labels in the data column; without selection, one (oracle) row per method."""
    monkeypatch.chdir(tmp_path)
    methods = tmp_path / "methods.yaml"
    methods.write_text(yaml.safe_dump({"sweep": {"grid": {"model": [
        {"class_path": "mergelit.methods.TaskArithmetic", "grid": {"scaling_factor": [0.3, 0.9]}},
        {"class_path": "mergelit.methods.TiesMerging", "grid": {"scaling_factor": [0.3, 0.9]}},
        {"class_path": "mergelit.methods.Individual", "grid": {"task": ["cola", "sst2"]}},
        {"class_path": "mergelit.methods.SimpleAverage"},
    ]}}}))
    out = tmp_path / "methods"
    args = ["compare", "-c", str(fixtures_root / "config.yaml"), "-c", str(methods), "--output_dir", str(out),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main([*args, "--sweep.select_on", "dev", "--sweep.oracle", "true"])
    rows = tables.sweep_rows(out)
    assert [r.role for r in rows] == ["selected", "oracle"] * 3 + [""]
    labels = [r.labels[0] for r in rows]
    assert [label.split(" (")[0] for label in labels] == ["Task Arithmetic"] * 2 + ["TIES-Merging"] * 2 + ["Individual"] * 2 + ["Simple Average"]
    assert all(", selected on dev (of 2)" in label for label in labels[0:6:2])
    assert all(", best of 2 (oracle)" in label for label in labels[1:6:2])
    assert all(r.data == "none + dev labels (validation rows)" for r in rows[0:6:2])
    table = (out / "table.md").read_text()
    lines = table.splitlines()
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    gain = headers.index("Δ TA")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:2 + len(rows)]]
    ta = rows[0].report["average"]["accuracy"]
    assert cells[0][gain] == "ref" and cells[1][gain] == "ref"
    assert cells[2][gain] == f"{100 * (rows[2].report['average']['accuracy'] - ta):+.1f}"  # selected vs selected
    assert cells[3][gain] == f"{100 * (rows[3].report['average']['accuracy'] - rows[1].report['average']['accuracy']):+.1f}"
    assert cells[0][headers.index("data")] == "none + dev labels (validation rows)"

    # The same points without selection (their reports are all there): one row per method, its best.
    main([*args, "--data.hold_out_dev", "true"])
    rows = tables.sweep_rows(out)
    assert [r.role for r in rows] == ["oracle"] * 3 + [""]
    assert all(", best of 2 (oracle)" in r.labels[0] for r in rows[:3])


def test_a_method_without_a_range_is_merged_and_scored_once(fixtures_root, tmp_path, monkeypatch):
    """Nothing to choose for a method of one point: its dev criterion and its validation report come
    from one merge in the first pass; a method with a range is scored on validation at its choice."""
    import mergelit.sweep as sweep_module

    monkeypatch.chdir(tmp_path)
    built, tests = [], []
    make, run = sweep_module.make_method, sweep_module.run_test
    monkeypatch.setattr(sweep_module, "make_method", lambda spec, pool: built.append(type(m := make(spec, pool)).__name__) or m)
    monkeypatch.setattr(sweep_module, "run_test", lambda trainer, method, *a, **k: tests.append(type(method).__name__) or run(trainer, method, *a, **k))
    methods = tmp_path / "methods.yaml"
    methods.write_text(yaml.safe_dump({"sweep": {"select_on": "dev", "grid": {"model": [
        {"class_path": "mergelit.methods.TaskArithmetic", "grid": {"scaling_factor": [0.3, 0.9]}},
        {"class_path": "mergelit.methods.SimpleAverage"},
    ]}}}))
    out = tmp_path / "methods"
    main(["compare", "-c", str(fixtures_root / "config.yaml"), "-c", str(methods), "--output_dir", str(out),
          "--trainer.logger", "false"])
    # Every point is built once when the plan checks it, then once per scoring pass.
    assert built.count("SimpleAverage") == 1 + 1 and tests.count("SimpleAverage") == 1
    assert built.count("TaskArithmetic") == 2 + 2 + 1 and tests.count("TaskArithmetic") == 1  # 2 on dev, the chosen again
    assert len(list(out.glob("*.criterion.json"))) == 3  # the selection still reads every point's criterion
    rows = tables.sweep_rows(out)
    assert [r.role for r in rows] == ["selected", ""]
