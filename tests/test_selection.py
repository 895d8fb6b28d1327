"""Selection without the validation labels (issue 12, parts 1 and 3): the dev split carved from
train (seeded, recorded, disjoint from the statistics rows under hold_out_dev), the label-free
agreement criterion, `mergelit sweep --sweep.select_on dev|agreement` (selected and oracle rows,
sweep.json), the selection blind to the validation labels, and `compare` using the selected point."""

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


def relabelled_copy(source: Path, target: Path, split: str, how: str) -> Path:
    """A copy of the GLUE folder whose ``split`` labels are permuted (``how="permute"``) or flipped."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        splits = datasets.load_from_disk(str(folder))
        for name in [s for s in splits if s == split or (split == "validation" and s.startswith("validation"))]:
            labels = splits[name]["label"]
            if how == "permute":
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(123)).tolist()
                new = [labels[i] for i in order]
            else:
                count = max(labels) + 1
                new = [(label + 1) % count for label in labels]
            splits[name] = splits[name].remove_columns("label").add_column("label", new).cast(splits[name].features)
        splits.save_to_disk(str(target / folder.name))
    return target


# ---- the dev split ---------------------------------------------------------------------------
def test_dev_split_is_seeded_capped_and_the_train_rows(fixtures_root):
    _, data = two_tasks(fixtures_root)
    n = len(data.train_dataset("rte"))
    dev = data.dev_indices("rte")
    assert len(dev) == min(500, n // 2) and dev == sorted(set(dev))  # half of a small split, no repeats
    assert dev == two_tasks(fixtures_root)[1].dev_indices("rte")  # seeded: the same rows every time
    assert dev != two_tasks(fixtures_root, dev_seed=1)[1].dev_indices("rte")
    assert len(two_tasks(fixtures_root, dev_size=10)[1].dev_indices("rte")) == 10
    rows = data.dev_dataset("rte")
    assert rows["input_ids"] == data.train_dataset("rte").select(dev)["input_ids"]
    assert rows["label"] == data.train_dataset("rte").select(dev)["label"]  # labeled
    assert data.statistics_excluded("rte") == []  # statistics untouched unless hold_out_dev
    with pytest.raises(ValueError, match="dev_size"):
        GLUEDataModule(tasks=["rte"], dev_size=-1)
    with pytest.raises(ValueError, match="hold_out_dev"):
        GLUEDataModule(tasks=["rte"], dev_size=0, hold_out_dev=True)


def test_draw_examples_skips_excluded_rows_in_the_same_order():
    plain = draw_examples(100, 30, seed=7)
    assert draw_examples(100, 30, seed=7, exclude=()) == plain  # no dev split: the draw of before
    held_out = set(plain[::3])
    drawn = draw_examples(100, 30, seed=7, exclude=sorted(held_out))
    assert len(drawn) == 30 and not held_out & set(drawn)
    full = draw_examples(100, 100, seed=7)
    assert drawn == [i for i in full if i not in held_out][:30]  # the same permutation, dev rows dropped


def test_statistics_rows_are_disjoint_from_the_dev_rows_under_hold_out_dev(fixtures_root, tmp_path):
    pool, data = two_tasks(fixtures_root, hold_out_dev=True)
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
    flipped_pool, flipped = two_tasks(fixtures_root, relabelled_copy(Path(data.path), tmp_path / "glue", "train", "flip"))
    method = TaskArithmetic(pool, scaling_factor=0.5)
    agreement = CriterionScorer("agreement").score(method, data)
    # Every train label (so every dev label) changed: agreement is the same to the bit ...
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


@pytest.mark.parametrize("select_on", ["dev", "agreement"])
def test_sweep_selects_on_the_criterion_and_shows_selected_and_oracle(select_on, fixtures_root, tmp_path):
    out = tmp_path / "sweep"
    manifest = run_sweep(fixtures_root, out, select_on)
    points = list(manifest["points"])
    assert manifest["select_on"] == select_on and set(manifest["criterion"]) == set(points)
    chosen = select(points, manifest["criterion"])  # the argmax of the criterion values alone
    assert manifest["selected_points"] == [chosen]
    assert manifest["selected"] == {"model.init_args.scaling_factor": manifest["points"][chosen]["overrides"]["model.init_args.scaling_factor"]}
    dev = manifest["dev"]
    assert dev["seed"] == 0 and dev["size"] == 500 and dev["split"] == "train" and len(dev["sha256"]) == 16
    assert manifest["config"]["data.hold_out_dev"] is True  # the points' statistics skip the dev rows
    assert manifest["labels_used"] == ("none" if select_on == "agreement" else "dev labels (train rows)")

    table = (out / "table.md").read_text()
    assert f"**selected** on {select_on}: {chosen}" in table and "**oracle** (best of 3)" in table
    assert table.splitlines()[0].split("|")[2].strip() == ("dev accuracy" if select_on == "dev" else "agreement")
    # The selected point's report records what chose it; the others do not.
    report = json.loads((out / f"{chosen}.json").read_text())
    assert report["protocol"]["selection"]["select_on"] == select_on
    assert report["protocol"]["selection"]["criterion"] == manifest["criterion"][chosen]
    assert all("selection" not in json.loads((out / f"{p}.json").read_text()).get("protocol", {}) for p in points if p != chosen)
    # compare uses the selected point and says so.
    assert f", selected on {select_on} (of 3)" in tables.compare([out])


def test_permuting_the_validation_labels_leaves_the_selection_unchanged(fixtures_root, tmp_path):
    glue = Path(yaml.safe_load((fixtures_root / "config.yaml").read_text())["data"]["path"])
    permuted = relabelled_copy(glue, tmp_path / "glue", "validation", "permute")
    first = run_sweep(fixtures_root, tmp_path / "a", "dev")
    second = run_sweep(fixtures_root, tmp_path / "b", "dev", "--data.path", str(permuted))
    assert second["selected"] == first["selected"] and second["criterion"] == first["criterion"]
    assert second["dev"] == first["dev"]
    # ... while the validation numbers (what is reported) did change.
    name = first["selected_points"][0]
    assert json.loads((tmp_path / "a" / f"{name}.json").read_text())["average"] != json.loads(
        (tmp_path / "b" / f"{name}.json").read_text())["average"]


def test_select_on_none_keeps_todays_sweep(fixtures_root, tmp_path):
    out = tmp_path / "none"
    manifest = run_sweep(fixtures_root, out, "none")
    assert "selected" not in manifest and "criterion" not in manifest
    assert manifest["config"]["data.hold_out_dev"] is False
    assert "selected" not in (out / "table.md").read_text() and not list(out.glob("*.criterion.json"))
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
    assert tests == [] and set(manifest["criterion"]) == set(manifest["points"])
