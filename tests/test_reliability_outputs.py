"""Reliability of outputs, numbers, input classes, messages and trust boundaries, end to end.

Every case runs ``mergelit ...`` through ``mergelit.__main__.main`` in-process (two real processes
for the concurrent log versions); ``heavy_work_forbidden`` makes ``Trainer.test``/``predict``/``fit``
fail loudly, so a check that fires only after the heavy work started fails its test.
docs/reliability.md lists each case with its message.

Most runs use a pool of two or three tasks of the fixture pool (seconds each).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergelit.__main__ import main
from mergelit.report import make_report, write_report
from test_reliability import (  # noqa: F401  (fixtures)
    CONFIGS,
    METHOD,
    assert_short_error,
    copy_data,
    copy_model,
    edit_config,
    edit_weights,
    heavy_work_forbidden,
    mergelit,
    workdir,
)

TIES = CONFIGS / "methods" / "ties_merging.yaml"
ADAMERGING = CONFIGS / "methods" / "adamerging.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def small_config(fixtures_root: Path, folder: Path, tasks=("cola", "rte"), **finetuned: str) -> Path:
    """The fixture run config with a pool of ``tasks`` only (``finetuned``: other folders for some)."""
    config = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    config["pool"]["finetuned"] = {t: finetuned.get(t, config["pool"]["finetuned"][t]) for t in tasks}
    path = folder / f"run-{'-'.join(tasks)}-{len(list(folder.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_args(config: Path, *extra: str, method: Path = METHOD) -> list[str]:
    """``mergelit test -c CONFIG -c METHOD EXTRA...``."""
    return ["test", "-c", str(config), "-c", str(method), *extra]


def reports_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("report.json"))


# ==== 1. every output location owned by one run ================================================
def test_two_concurrent_runs_get_two_log_versions(fixtures_root, workdir):
    """Two real `mergelit test` processes started together in one folder: two version folders."""
    config = small_config(fixtures_root, workdir)
    command = [sys.executable, "-m", "mergelit", *run_args(config, "--quiet")]
    runs = [subprocess.Popen(command, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    printed = sorted(line for out, _ in outputs for line in out.splitlines() if line.startswith("Report: "))
    assert printed == ["Report: lightning_logs/version_0/report.json", "Report: lightning_logs/version_1/report.json"]
    reports = [json.loads(path.read_text()) for path in reports_under(workdir / "lightning_logs")]
    assert len(reports) == 2 and all(r["average"] for r in reports)


def test_log_versions_are_claimed_even_when_both_runs_list_the_folder_first(tmp_path, monkeypatch):
    """The race itself, made certain: both loggers list the folder before either made its version."""
    from lightning.pytorch.loggers import CSVLogger

    from mergelit.report import RunLogger

    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)
    first, second = RunLogger(save_dir=str(tmp_path)), RunLogger(save_dir=str(tmp_path))
    assert (first.version, second.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_a_reused_report_path_keeps_no_earlier_predictions(fixtures_root, workdir, capsys):
    from mergelit import tables

    report = workdir / "out" / "r.json"
    predictions = report.parent / "predictions"
    three = small_config(fixtures_root, workdir, ("cola", "rte", "sst2"))
    two = small_config(fixtures_root, workdir, ("cola", "rte"))
    code, err = mergelit(capsys, *run_args(three, "--report_save_path", str(report), "--save_predictions", "true"))
    assert code == 0, err
    assert sorted(p.name for p in predictions.glob("*.jsonl")) == ["cola.jsonl", "rte.jsonl", "sst2.jsonl"]
    code, err = mergelit(capsys, *run_args(two, "--report_save_path", str(report), "--save_predictions", "true"))
    assert code == 0, err
    assert sorted(p.name for p in predictions.iterdir()) == ["cola.jsonl", "manifest.json", "rte.jsonl"]
    rescored, written = tables.metrics_from_predictions(predictions), json.loads(report.read_text())
    assert rescored["average"]["accuracy"] == written["average"]["accuracy"]  # the folder is this run's alone
    code, err = mergelit(capsys, *run_args(two, "--report_save_path", str(report)))  # no predictions asked
    assert code == 0, err
    assert not list(predictions.iterdir())


def test_a_reused_export_folder_keeps_no_earlier_task_folders(fixtures_root, workdir, capsys):
    export = workdir / "merged"
    for tasks in (("cola", "rte"), ("cola", "sst2")):
        code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir, tasks), "--merged_model_save_path", str(export)))
        assert code == 0, err
    assert sorted(p.name for p in export.iterdir()) == ["cola", "sst2"]


@pytest.mark.parametrize("kind", ["folder with other files", "a file"])
def test_an_export_path_that_is_not_an_export_folder_is_refused_first(kind, fixtures_root, workdir, capsys, heavy_work_forbidden):
    export = workdir / "merged"
    if kind == "a file":
        export.write_text("mine")
    else:
        export.mkdir()
        (export / "notes.txt").write_text("mine")
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--merged_model_save_path", str(export)))
    assert_short_error(code, err, str(export), *(["notes.txt", "not a mergelit export"] if kind != "a file" else ["is a file"]))
    assert (export / "notes.txt").exists() or export.is_file()


def test_an_existing_folder_as_report_path_is_refused_first(fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "r.json").mkdir()
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--report_save_path", str(workdir / "r.json")))
    assert_short_error(code, err, "r.json", "is a folder")


# ==== 2. numbers checked before they are written or read =========================================
def _huge_entry(tensors):
    key = "transformer.h.0.mlp.c_fc.weight"
    tensors[key][0, 0] = 3e38  # finite, and every sum through it overflows


@pytest.mark.parametrize("case", ["scaling factor 1e30", "one 3e38 entry"])
def test_a_forward_that_overflows_fails_naming_the_task_and_writes_no_report(case, fixtures_root, workdir, capsys):
    if case == "one 3e38 entry":
        cola = copy_model(fixtures_root, "cola", workdir / "huge_cola")
        edit_weights(cola, _huge_entry)
        args = run_args(small_config(fixtures_root, workdir, cola=str(cola)))
    else:
        args = run_args(small_config(fixtures_root, workdir), "--model.init_args.scaling_factor", "1e30")
    code, err = mergelit(capsys, *args, "--report_save_path", str(workdir / "r.json"))
    assert_short_error(code, err, "Task 'cola'", "non-finite logits", "overflows", "scaling factor", "extreme weight")
    assert not (workdir / "r.json").exists() and not reports_under(workdir)


def test_a_partial_runs_predictions_are_marked_and_refused_by_rescoring(fixtures_root, workdir, capsys):
    from mergelit import tables

    report = workdir / "r.json"
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--trainer.limit_test_batches", "1",
                                            "--report_save_path", str(report), "--save_predictions", "true"))
    assert code == 0, err
    assert json.loads((workdir / "predictions" / "manifest.json").read_text())["partial"] is True
    with pytest.raises(ValueError, match="partial run"):
        tables.metrics_from_predictions(workdir / "predictions")
    code, err = mergelit(capsys, "compare", str(report))
    assert_short_error(code, err, str(report), "partial evaluation")


def _relabel_float(task, split, row, value):
    import datasets

    def edit(d):
        part = d[split].cast_column("label", datasets.Value("float64"))
        part = part.map(lambda r, i: {"label": value if i == row else r["label"]}, with_indices=True)
        return datasets.DatasetDict({**d, split: part})

    return edit


def test_a_float_label_is_refused_naming_task_split_and_row(fixtures_root, workdir, capsys, heavy_work_forbidden):
    data = copy_data(fixtures_root, workdir / "glue", "cola", _relabel_float("cola", "validation", 2, 0.7))
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--data.path", str(data)))
    assert_short_error(code, err, "'cola'", "'validation'", "'label' row 2 is 0.7")


# ---- compare validates every report it reads, naming the file ----------------------------------
TWO = ("cola", "rte")


def good_report(**changes) -> dict:
    report = make_report({"cola": {"accuracy": 0.6, "loss": 0.7, "mcc": 0.1}, "rte": {"accuracy": 0.5, "loss": 0.69}},
                         {"mnli_mismatched": {"accuracy": 0.4, "loss": 1.1}}, {"kind": "merged", "partial": False})
    for path, value in changes.items():
        *parents, last = path.split(".")
        entry = report
        for part in parents:
            entry = entry[part]
        if value is DELETE:
            del entry[last]
        else:
            entry[last] = value
    return report


DELETE = object()


def percent(report: dict) -> dict:
    for key in ("cola", "rte", "average"):
        report[key]["accuracy"] *= 100
    return report


BAD_REPORTS = {
    "in percent": (percent(good_report()), ["cola.accuracy is 60.0", "not a fraction", "percent"]),
    "accuracy 1.7": (make_report({"cola": {"accuracy": 1.7, "loss": 0.7}, "rte": {"accuracy": 0.5, "loss": 0.7}}),
                     ["cola.accuracy is 1.7", "not a fraction in [0, 1]"]),
    "accuracy -0.2": (make_report({"cola": {"accuracy": -0.2, "loss": 0.7}, "rte": {"accuracy": 0.5, "loss": 0.7}}),
                      ["cola.accuracy is -0.2"]),
    "average contradicts": (good_report(**{"average.accuracy": 0.9}), ["average.accuracy is 0.9", "mean of its 2 tasks", "contradicts"]),
    "average loss contradicts": (good_report(**{"average.loss": 0.1}), ["average.loss is 0.1"]),
    "unknown task": ({**good_report(), "sst3": {"accuracy": 0.5, "loss": 0.7}}, ["'sst3'", "no GLUE task"]),
    "a prefixed task": ({**good_report(), "gpt2_sst2": {"accuracy": 0.5, "loss": 0.7}}, ["'gpt2_sst2'", "no GLUE task"]),
    "no loss": (good_report(**{"rte.loss": DELETE}), ["'rte' entry has no 'loss'"]),
    "no accuracy": (good_report(**{"cola.accuracy": DELETE}), ["'cola' entry has no 'accuracy'"]),
    "mcc 1.5": (good_report(**{"cola.mcc": 1.5}), ["cola.mcc is 1.5", "[-1, 1]"]),
    "f1 as percent": (good_report(**{"cola.f1": 52.0}), ["cola.f1 is 52.0", "percent"]),
    "negative loss": (good_report(**{"rte.loss": -1.0}), ["rte.loss is -1.0"]),
    "NaN accuracy": (good_report(**{"rte.accuracy": math.nan}), ["rte.accuracy is nan", "not a finite number"]),
    "a string accuracy": (good_report(**{"rte.accuracy": "0.5"}), ["rte.accuracy is '0.5'"]),
    "an entry that is a number": (good_report(**{"rte": 0.5}), ["'rte' entry is 0.5", "not a mapping"]),
    "mismatched 2.0": (good_report(**{"mnli_mismatched.accuracy": 2.0}), ["mnli_mismatched.accuracy is 2.0"]),
    "partial": (good_report(**{"protocol.partial": True}), ["partial evaluation"]),
    "partial not a bool": (good_report(**{"protocol.partial": "no"}), ["protocol.partial is 'no'"]),
    "protocol not a mapping": (good_report(**{"protocol": ["x"]}), ["'protocol' entry"]),
    "damaged per-example": (good_report(**{"protocol.per_example": {"cola": {"rows": 3}}}), ["per_example.cola is damaged"]),
    "damaged interval": (good_report(**{"protocol.uncertainty": {"accuracy": {"cola": [0.9, 0.1]}}}), ["uncertainty.accuracy.cola"]),
    "not an object": ([0.5, 0.6], ["JSON object"]),
    "no task": ({"average": {"accuracy": 0.5, "loss": 0.7}}, ["names no task"]),
}


@pytest.mark.parametrize("case", list(BAD_REPORTS))
def test_compare_refuses_a_report_it_cannot_trust_naming_the_file(case, tmp_path, capsys):
    report, needles = BAD_REPORTS[case]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    code, err = mergelit(capsys, "compare", str(path))
    assert_short_error(code, err, str(path), "not a complete mergelit/FusionBench report", *needles)


def test_compare_accepts_the_good_report_and_a_fusionbench_one(tmp_path, capsys):
    write_report(good_report(), tmp_path / "good.json")
    (tmp_path / "fusionbench.json").write_text(json.dumps({"cola": {"accuracy": 0.6, "loss": 0.7}, "rte": {"accuracy": 0.5, "loss": 0.7}}))
    code, err = mergelit(capsys, "compare", str(tmp_path / "good.json"), str(tmp_path / "fusionbench.json"))
    assert code == 0, err


def test_compare_names_the_report_inside_a_run_folder_and_a_sweep_folder(tmp_path, capsys):
    run = tmp_path / "lightning_logs" / "version_3"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(percent(good_report())))
    code, err = mergelit(capsys, "compare", str(tmp_path / "lightning_logs"))
    assert_short_error(code, err, str(run / "report.json"), "percent")
    sweep = write_sweep(tmp_path / "sweep", {"scaling_factor=0.3": good_report(**{"average.accuracy": 0.1})})
    code, err = mergelit(capsys, "compare", str(sweep))
    assert_short_error(code, err, str(sweep / "scaling_factor=0.3.json"), "contradicts")


def write_sweep(folder: Path, reports: dict, manifest: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    points = {}
    for name, report in reports.items():
        write_report(report, folder / f"{name}.json")
        points[name] = {"overrides": {"model.init_args.scaling_factor": 0.3},
                        "model": {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.3}}}
    (folder / "sweep.json").write_text(json.dumps(manifest if manifest is not None else {"tasks": list(TWO), "points": points}))
    return folder


# ==== 3. validation by class ======================================================================
ARCHITECTURE = [
    ("model_type", "gpt_neo"), ("n_layer", 3), ("n_embd", 32), ("n_head", 8), ("n_inner", 128), ("n_positions", 256),
    ("vocab_size", 50000), ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("add_cross_attention", True),
    ("is_encoder_decoder", True),
]


def test_the_architecture_cases_cover_every_architecture_field():
    from mergelit.pool import ARCHITECTURE_FIELDS

    assert sorted(field for field, _ in ARCHITECTURE) == sorted(ARCHITECTURE_FIELDS)


@pytest.mark.parametrize("field, value", ARCHITECTURE, ids=[f for f, _ in ARCHITECTURE])
def test_a_fine_tuned_body_of_another_architecture_is_refused_naming_the_field(field, value, fixtures_root, workdir, capsys,
                                                                               heavy_work_forbidden):
    rte = copy_model(fixtures_root, "rte", workdir / "other_rte")
    edit_config(rte, **{field: value})
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir, rte=str(rte))))
    assert_short_error(code, err, "'rte'", "other_rte", f"{field} {value!r}", "architecture")


def test_an_explicit_n_inner_equal_to_the_default_is_the_same_architecture(fixtures_root, workdir):
    from mergelit.pool import ModelPool

    rte = copy_model(fixtures_root, "rte", workdir / "rte")
    edit_config(rte, n_inner=4 * json.loads((rte / "config.json").read_text())["n_embd"])  # None means 4 * n_embd
    ModelPool(str(fixtures_root / "pool" / "pretrained"), {"rte": str(rte)}).check()


@pytest.mark.parametrize("change", ["an extra tensor", "a missing tensor"])
def test_a_fine_tuned_body_with_another_tensor_set_is_refused_naming_the_tensor(change, fixtures_root, workdir, capsys,
                                                                                heavy_work_forbidden):
    rte = copy_model(fixtures_root, "rte", workdir / "rte")
    if change == "an extra tensor":
        edit_weights(rte, lambda t: t.__setitem__("transformer.h.2.ln_1.weight", torch.ones(64)))
        needles = ["'transformer.h.2.ln_1.weight'", "silently ignored"]
    else:
        edit_weights(rte, lambda t: t.pop("transformer.h.1.attn.c_proj.bias"))
        needles = ["'transformer.h.1.attn.c_proj.bias'"]
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir, rte=str(rte))))
    assert_short_error(code, err, "'rte'", *needles)


def fusionbench_models(fixtures_root: Path, names: dict[str, str]) -> list[dict]:
    return [{"name": "_pretrained_", "path": str(fixtures_root / "pool" / "pretrained")},
            *({"name": name, "path": str(fixtures_root / "pool" / task)} for name, task in names.items())]


@pytest.mark.parametrize("where", ["run config mapping", "FusionBench pool mapping", "FusionBench pool file",
                                   "FusionBench pool in a run config", "FusionBench list names a model twice"])
def test_a_task_named_twice_is_refused_wherever_tasks_are_named(where, fixtures_root, workdir, capsys, heavy_work_forbidden):
    pool = fixtures_root / "pool"
    base = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    del base["pool"]
    (workdir / "base.yaml").write_text(yaml.safe_dump(base))
    args = ["test", "-c", str(workdir / "base.yaml")]
    if where == "run config mapping":
        (workdir / "pool.yaml").write_text(
            f"pool:\n  pretrained: {pool / 'pretrained'}\n  finetuned:\n    sst2: {pool / 'sst2'}\n"
            f"    cola: {pool / 'cola'}\n    sst2: {pool / 'rte'}\n")
        args += ["-c", str(workdir / "pool.yaml")]
        needles = ["pool.yaml", "'sst2' appears twice", "lines 4 and 6"]
    elif where == "FusionBench pool mapping":
        (workdir / "fb.yaml").write_text(f"models:\n  _pretrained_: {pool / 'pretrained'}\n  sst2: {pool / 'sst2'}\n"
                                         f"  sst2: {pool / 'rte'}\n")
        args += ["--pool", str(workdir / "fb.yaml")]
        needles = ["fb.yaml", "'sst2' appears twice"]
    elif where == "FusionBench pool file":
        (workdir / "fb.yaml").write_text(yaml.safe_dump({"models": fusionbench_models(fixtures_root, {"sst2": "sst2", "gpt2_sst2": "rte"})}))
        args += ["--pool", str(workdir / "fb.yaml")]
        needles = ["task 'sst2' twice", "'gpt2_sst2'"]
    elif where == "FusionBench pool in a run config":
        (workdir / "run.yaml").write_text(yaml.safe_dump(
            {"pool": {"models": {"_pretrained_": str(pool / "pretrained"), "gpt2_cola": str(pool / "cola"), "cola": str(pool / "rte")}}}))
        args += ["-c", str(workdir / "run.yaml")]
        needles = ["task 'cola' twice", "'gpt2_cola'"]
    else:
        (workdir / "fb.yaml").write_text(yaml.safe_dump({"models": [*fusionbench_models(fixtures_root, {"cola": "cola"}),
                                                                    {"name": "_pretrained_", "path": str(pool / "rte")}]}))
        args += ["--pool", str(workdir / "fb.yaml")]
        needles = ["'_pretrained_' twice"]
    code, err = mergelit(capsys, *args, "-c", str(METHOD))
    assert_short_error(code, err, *needles)


def tokenizer_copy(fixtures_root: Path, folder: Path, permute: bool) -> Path:
    """The fixture tokenizer as vocab.json + merges.txt; ``permute``: the same tokens, ids shuffled."""
    source = fixtures_root / "pool" / "pretrained"
    folder.mkdir()
    shutil.copy(source / "merges.txt", folder)
    vocab = json.loads((source / "vocab.json").read_text())
    ids = list(vocab.values())
    if permute:
        random.Random(0).shuffle(ids)
    (folder / "vocab.json").write_text(json.dumps(dict(zip(vocab, ids))))
    return folder


def test_a_tokenizer_with_a_permuted_vocabulary_is_refused(fixtures_root, workdir, capsys, heavy_work_forbidden):
    """The same size, other ids: refused, since the pool's checkpoints carry their own tokenizer; the
    same vocabulary in the same files passes the check (and fails only at the forbidden test)."""
    config = small_config(fixtures_root, workdir)
    permuted = tokenizer_copy(fixtures_root, workdir / "permuted", permute=True)
    code, err = mergelit(capsys, *run_args(config, "--pool.tokenizer", str(permuted)))
    assert_short_error(code, err, "permuted", "other token ids", str(fixtures_root / "pool" / "cola"), "pool.tokenizer")
    same = tokenizer_copy(fixtures_root, workdir / "same", permute=False)
    with pytest.raises(AssertionError, match="heavy work started"):
        main(run_args(config, "--pool.tokenizer", str(same)))


# ==== 4. checked before the heavy work ============================================================
def _texts(task, split, row, fields, value):
    import datasets

    def edit(d):
        part = d[split].map(lambda r, i: {f: value if i == row else r[f] for f in fields}, with_indices=True)
        return datasets.DatasetDict({**d, split: part})

    return edit


def _string_labels(task, split):
    import datasets

    def edit(d):
        part = d[split].cast_column("label", datasets.Value("int64")).map(lambda r: {"label": str(r["label"])})
        return datasets.DatasetDict({**d, split: part.cast_column("label", datasets.Value("string"))})

    return edit


def _bytes_texts(task, split, field):
    import datasets

    def edit(d):
        part = d[split].map(lambda r: {"encoded": r[field].encode()}).remove_columns(field).rename_column("encoded", field)
        return datasets.DatasetDict({**d, split: part})

    return edit


def _mismatched(kind):
    import datasets

    def edit(d):
        part = d["validation_mismatched"]
        if kind == "empty":
            part = part.select([])
        else:
            part = part.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
        return datasets.DatasetDict({**d, "validation_mismatched": part})

    return edit


@pytest.mark.parametrize(
    "case, task, edit, needles",
    [
        ("empty pair texts", "rte", _texts("rte", "validation", 3, ("sentence1", "sentence2"), ""),
         ["'rte'", "'validation'", "row 3 has no text"]),
        ("None text", "cola", _texts("cola", "validation", 5, ("sentence",), None), ["'cola'", "'validation'", "row 5", "NoneType"]),
        ("NaN label", "cola", _relabel_float("cola", "validation", 1, math.nan), ["'cola'", "'validation'", "'label' row 1 is nan"]),
        ("string labels", "rte", _string_labels("rte", "validation"), ["'rte'", "'validation'", "'label' row 0 is str"]),
        ("bytes texts", "cola", _bytes_texts("cola", "validation", "sentence"), ["'cola'", "'validation'", "'sentence'", "not text"]),
        ("mismatched -1 labels", "mnli", _mismatched("-1"), ["'mnli'", "'validation_mismatched'", "row 0 is -1"]),
        ("mismatched empty", "mnli", _mismatched("empty"), ["'mnli'", "empty"]),
    ],
)
def test_bad_data_is_refused_before_the_merge(case, task, edit, needles, fixtures_root, workdir, capsys, heavy_work_forbidden):
    data = copy_data(fixtures_root, workdir / "glue", task, edit)
    config = small_config(fixtures_root, workdir, ("cola", "mnli", "rte"))
    code, err = mergelit(capsys, *run_args(config, "--data.path", str(data)))
    assert_short_error(code, err, *needles)


def test_adamerging_coefficients_path_that_is_a_folder_is_refused_before_adapting(fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "lambda").mkdir()
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--model.init_args.max_steps", "3",
                                            "--model.init_args.coefficients_path", str(workdir / "lambda"), method=ADAMERGING))
    assert_short_error(code, err, "coefficients_path", str(workdir / "lambda"), "is a folder")


def test_adamerging_with_max_time_is_refused_before_adapting(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--model.init_args.max_steps", "3",
                                            "--trainer.max_time", "00:00:10:00", method=ADAMERGING))
    assert_short_error(code, err, "trainer.max_time", "AdaMerging")


def sweep_args(config: Path, method: Path, grid: dict, out: Path, *extra: str) -> list[str]:
    return ["sweep", "-c", str(config), "-c", str(method), "--sweep.grid", json.dumps(grid), "--output_dir", str(out), *extra]


@pytest.mark.parametrize("grid, needles", [
    ({"model.init_args.threshold": [20, 200]}, ["threshold=200", "threshold", "200"]),
    ({"model": [{"class_path": "mergelit.methods.TaskArithmetic"},
                {"class_path": "mergelit.methods.TiesMerging", "init_args": {"threshold": 0}}]}, ["TiesMerging", "threshold", "0"]),
    ({"data.dev_fraction": [0.1, 1.0]}, ["dev_fraction=1.0", "dev_fraction"]),
])
def test_a_sweep_checks_every_points_config_before_the_first_point(grid, needles, fixtures_root, workdir, capsys, heavy_work_forbidden):
    out = workdir / "sweep"
    code, err = mergelit(capsys, *sweep_args(small_config(fixtures_root, workdir), TIES, grid, out))
    assert_short_error(code, err, "Sweep point", *needles)
    assert not out.exists() or not list(out.glob("*.json"))


def _rows(task, split, count):
    import datasets

    def edit(d):
        return datasets.DatasetDict({**d, split: d[split].select(range(count))})

    return edit


@pytest.mark.parametrize("source, split, fix", [("train", "train", "--data.dev_source validation"),
                                                ("validation", "validation", "--data.dev_source train")])
def test_select_on_dev_without_enough_rows_for_a_dev_split_is_refused_first(source, split, fix, fixtures_root, workdir, capsys,
                                                                            heavy_work_forbidden):
    data = copy_data(fixtures_root, workdir / "glue", "rte", _rows("rte", split, 1))
    out = workdir / "sweep"
    code, err = mergelit(capsys, *sweep_args(small_config(fixtures_root, workdir), METHOD,
                                             {"model.init_args.scaling_factor": [0.1, 0.3]}, out, "--data.path", str(data),
                                             "--sweep.select_on", "dev", "--data.dev_source", source))
    assert_short_error(code, err, "'rte'", f"split '{split}'", "1 row(s)", fix)
    assert not out.exists() or not list(out.glob("*.json"))


# ==== 5. messages keep their subject =============================================================
def test_a_full_disk_names_the_report_path_and_leaves_no_file(fixtures_root, workdir, capsys, monkeypatch):
    real = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".r.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    report = workdir / "out" / "r.json"
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--trainer.logger", "false",
                                            "--report_save_path", str(report)))
    assert_short_error(code, err, str(report), "No space left on device")
    assert not list(report.parent.iterdir())  # neither the report nor its temporary file


def test_a_report_path_that_cannot_be_written_is_named_before_the_merge(fixtures_root, workdir, capsys, heavy_work_forbidden):
    # /sys refuses new files even to root, where os.access says yes: a real file is tried.
    path = "/sys/mergelit-nowhere/r.json"
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--report_save_path", path))
    assert_short_error(code, err, path, "cannot be written")


@pytest.mark.parametrize("form", ["-c FOLDER", "--config=FOLDER"])
def test_a_config_option_given_a_folder_says_it_is_a_folder(form, fixtures_root, workdir, capsys):
    (workdir / "configs").mkdir()
    flag = ["-c", str(workdir / "configs")] if form == "-c FOLDER" else [f"--config={workdir / 'configs'}"]
    code, err = mergelit(capsys, "test", "-c", str(small_config(fixtures_root, workdir)), *flag)
    assert_short_error(code, err, "configs", "is a folder", "YAML file")


def test_a_tokenizer_folder_without_vocabulary_files_is_named(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = workdir / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--pool.tokenizer", str(folder)))
    assert_short_error(code, err, "tok", "no tokenizer files", "vocab.json")
    assert "pad" not in err


def test_a_pretrained_config_that_contradicts_its_weights_blames_the_pretrained_model(fixtures_root, workdir, capsys,
                                                                                      heavy_work_forbidden):
    pretrained = copy_model(fixtures_root, "pretrained", workdir / "pre")
    edit_config(pretrained, n_positions=1024)  # its wpe has 512 rows
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--pool.pretrained", str(pretrained)))
    assert_short_error(code, err, "pretrained model", "'wpe.weight'", "(512,", "(1024,")
    assert "fine-tuned" not in err


def sharded(fixtures_root: Path, folder: Path, index) -> Path:
    copy_model(fixtures_root, "cola", folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


@pytest.mark.parametrize("case, index, needles", [
    ("no weight_map", {"metadata": {}}, ["no 'weight_map' entry"]),
    ("not JSON", '{"weight_map": {', ["damaged", "JSONDecodeError"]),
    ("a missing shard", {"weight_map": {"score.weight": "model-00002-of-00002.safetensors"}}, ["model-00002-of-00002", "missing"]),
    ("a shard outside", {"weight_map": {"score.weight": "../../elsewhere.safetensors"}}, ["elsewhere", "not a safetensors file of the checkpoint's folder"]),
])
def test_a_damaged_sharded_checkpoint_index_is_named(case, index, needles, fixtures_root, workdir, capsys, heavy_work_forbidden):
    cola = sharded(fixtures_root, workdir / "sharded", index)
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir, cola=str(cola))))
    assert_short_error(code, err, "model.safetensors.index.json", *needles)


def test_a_valid_sharded_checkpoint_loads(fixtures_root, workdir):
    from mergelit.pool import ModelPool

    cola = workdir / "sharded"
    copy_model(fixtures_root, "cola", cola)
    names = list(load_file(cola / "model.safetensors"))
    sharded(fixtures_root, workdir / "ok", {"weight_map": {name: "model-00001-of-00001.safetensors" for name in names}})
    pool = ModelPool(str(fixtures_root / "pool" / "pretrained"), {"cola": str(workdir / "ok")})
    assert torch.equal(pool.finetuned_tensor("cola", "wte.weight"), ModelPool(
        str(fixtures_root / "pool" / "pretrained"), {"cola": str(cola)}).finetuned_tensor("cola", "wte.weight"))


# ---- user input that reached a bare KeyError / TypeError: each a checked error naming the file ----
def sweep_folder(tmp_path: Path) -> Path:
    return write_sweep(tmp_path / "sweep", {"scaling_factor=0.3": good_report()})


@pytest.mark.parametrize("case, damage, needles", [
    ("manifest without tasks", lambda f: (f / "sweep.json").write_text(json.dumps({"points": {}})), ["sweep.json", "no list of 'tasks'"]),
    ("manifest without points", lambda f: (f / "sweep.json").write_text(json.dumps({"tasks": list(TWO)})), ["sweep.json", "no 'points'"]),
    ("point without overrides", lambda f: (f / "sweep.json").write_text(json.dumps(
        {"tasks": list(TWO), "points": {"scaling_factor=0.3": {"model": None}}})), ["sweep.json", "'scaling_factor=0.3'", "overrides"]),
    ("point model without class_path", lambda f: (f / "sweep.json").write_text(json.dumps(
        {"tasks": list(TWO), "points": {"scaling_factor=0.3": {"overrides": {}, "model": {"init_args": {}}}}})),
     ["sweep.json", "not a method"]),
    ("manifest of unknown tasks", lambda f: (f / "sweep.json").write_text(json.dumps({"tasks": ["sst3"], "points": {"a": {}}})),
     ["sweep.json", "'sst3'"]),
    ("truncated manifest", lambda f: (f / "sweep.json").write_text((f / "sweep.json").read_text()[:30]), ["sweep.json", "damaged"]),
    ("truncated selection", lambda f: (f / "selection.json").write_text('{"select_on": "dev", "gro'), ["selection.json", "damaged"]),
    ("selection without groups", lambda f: (f / "selection.json").write_text('{"select_on": "dev"}'), ["selection.json", "damaged"]),
    ("selection of an unknown point", lambda f: (f / "selection.json").write_text(json.dumps(
        {"select_on": "dev", "groups": {"": {"points": ["x"], "selected": "x"}}})), ["selection.json", "'x'", "does not list"]),
])
def test_a_damaged_sweep_folder_is_named_not_a_bare_key(case, damage, needles, tmp_path, capsys):
    folder = sweep_folder(tmp_path)
    damage(folder)
    code, err = mergelit(capsys, "compare", str(folder))
    assert_short_error(code, err, *needles)


@pytest.mark.parametrize("config, needles", [
    ("model: [1, 2]\n", ["config.yaml", "not a method"]),
    ("model: {init_args: {}}\n", ["config.yaml", "not a method"]),
    ("model:\n  class_path: x\n  class_path: y\n", ["config.yaml", "'class_path' appears twice"]),
    ("model: [unclosed\n", ["config.yaml", "not valid YAML"]),
])
def test_a_damaged_run_config_is_named(config, needles, tmp_path, capsys):
    run = tmp_path / "version_0"
    run.mkdir()
    write_report(good_report(), run / "report.json")
    (run / "config.yaml").write_text(config)
    code, err = mergelit(capsys, "compare", str(run))
    assert_short_error(code, err, *needles)


@pytest.mark.parametrize("manifest, rows, needles", [
    ('{"partial": false}', None, ["manifest.json", "damaged", "entries"]),
    ('{"entries": {"cola": 1}, "partial": fals', None, ["manifest.json", "damaged"]),
    ('{"entries": {"../x": 1}, "partial": false}', None, ["manifest.json", "'../x'", "no report entry"]),
    ('{"entries": {"cola": 1}, "partial": false}', '{"idx": 0, "label": 1}\n', ["cola.jsonl", "line 1", "not a prediction row"]),
    ('{"entries": {"cola": 1}, "partial": false}', '{"idx": 0, "label": 5, "prediction": 1, "logits": [0.0, 1.0]}\n',
     ["cola.jsonl", "label 5", "0..1"]),
    (None, None, ["foo.jsonl", "no report entry"]),
])
def test_a_damaged_predictions_folder_is_named(manifest, rows, needles, tmp_path):
    from mergelit import tables

    folder = tmp_path / "predictions"
    folder.mkdir()
    if manifest is None:
        (folder / "foo.jsonl").write_text('{"idx": 0, "label": 1, "prediction": 1, "logits": [0.0, 1.0], "loss": 0.3}\n')
    else:
        (folder / "manifest.json").write_text(manifest)
    (folder / "cola.jsonl").write_text(rows or '{"idx": 0, "label": 1, "prediction": 1, "logits": [0.0, 1.0], "loss": 0.3}\n')
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(ValueError) as error:
        tables.metrics_from_predictions(folder)
    for needle in needles:
        assert needle in str(error.value)


def ta_sweep(fixtures_root: Path, workdir: Path, out: Path, *extra: str) -> list[str]:
    return sweep_args(small_config(fixtures_root, workdir), METHOD, {"model.init_args.scaling_factor": [0.0, 0.5]}, out,
                      "--data.batch_size", "64", *extra)


def test_a_truncated_sweep_manifest_is_reported_as_damaged(fixtures_root, workdir, capsys):
    out = workdir / "sweep"
    args = ta_sweep(fixtures_root, workdir, out)
    code, err = mergelit(capsys, *args)
    assert code == 0, err
    (out / "sweep.json").write_text((out / "sweep.json").read_text()[:50])
    code, err = mergelit(capsys, *args)
    assert_short_error(code, err, str(out / "sweep.json"), "damaged", "--overwrite")
    assert "a sweep of another config" not in err
    code, err = mergelit(capsys, "compare", str(out))
    assert_short_error(code, err, str(out / "sweep.json"), "damaged")
    code, err = mergelit(capsys, *args, "--overwrite", "true")  # replaced: a complete sweep again
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["points"]


def test_a_damaged_criterion_file_is_named_and_its_point_scored_again(fixtures_root, workdir, capsys):
    out = workdir / "sweep"
    args = ta_sweep(fixtures_root, workdir, out, "--sweep.select_on", "dev")
    code, err = mergelit(capsys, *args)
    assert code == 0, err
    criterion = out / "scaling_factor=0.5.criterion.json"
    before = json.loads(criterion.read_text())
    criterion.write_text(criterion.read_text()[:20])
    with pytest.warns(UserWarning, match=r"criterion file .*scaling_factor=0\.5\.criterion\.json.* is damaged"):
        code, err = mergelit(capsys, *args)
    assert code == 0, err
    assert json.loads(criterion.read_text())["value"] == before["value"]
    from mergelit.selection import read_criterion

    criterion.write_text("[]")
    with pytest.raises(ValueError, match=r"criterion\.json.* is damaged"):
        read_criterion(out / "scaling_factor=0.5.json", "dev", {"sha256": before["dev_sha256"]})


# ==== 6. trust boundaries =========================================================================
@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module on sys.path that, if ever imported, leaves a file: a results folder must never import it."""
    (tmp_path / "planted").mkdir()
    marker = tmp_path / "imported"
    (tmp_path / "planted" / "planted_payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Payload:\n    display_name = 'Payload'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "planted"))
    yield marker
    sys.modules.pop("planted_payload", None)


def test_compare_never_imports_a_class_named_in_a_results_folder(tmp_path, capsys, planted_module):
    run = tmp_path / "runs" / "version_0"
    run.mkdir(parents=True)
    write_report(good_report(), run / "report.json")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "planted_payload.Payload", "init_args": {"x": 1}}}))
    sweep = write_sweep(tmp_path / "sweep", {"a": good_report()})
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest["points"]["a"]["model"]["class_path"] = "planted_payload.Payload"
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    main(["compare", str(tmp_path / "runs"), str(sweep)])
    assert not planted_module.exists() and "planted_payload" not in sys.modules
    labels = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert labels == ["Payload (x=1)", "Payload (scaling_factor=0.3)"]  # an unknown method: shown by name only


def test_method_classes_are_looked_up_in_the_allow_list_only(planted_module):
    from mergelit import tables
    from mergelit.methods.ties import TiesMerging

    for spelling in ("mergelit.methods.TiesMerging", "mergelit.methods.ties.TiesMerging", "TiesMerging"):
        assert tables.method_class(spelling) is TiesMerging
    for other in ("planted_payload.Payload", "os.system", "mergelit.tables.Row", "mergelit.methods.base.MergeMethod"):
        assert tables.method_class(other) is None
    assert not planted_module.exists()


def test_a_sweep_point_named_outside_its_folder_is_refused_and_never_touched(tmp_path, capsys):
    from mergelit import grid

    victim = tmp_path / "victim.json"
    write_report(good_report(), victim)
    folder = write_sweep(tmp_path / "sweep", {"a": good_report()})
    manifest = json.loads((folder / "sweep.json").read_text())
    manifest["points"]["../victim"] = manifest["points"]["a"]
    (folder / "sweep.json").write_text(json.dumps(manifest))
    code, err = mergelit(capsys, "compare", str(folder))
    assert_short_error(code, err, "sweep.json", "'../victim.json'", "outside the folder")
    # A resume with --overwrite replaces the folder's own files only.
    (folder / "sweep.json").write_text(json.dumps({**manifest, "fingerprint": "old"}))
    points = grid.grid_points({"model.init_args.scaling_factor": [0.3]})
    with pytest.raises(FileExistsError, match="outside the folder"):
        grid.prepare_folder(folder, {"fingerprint": "new", "grid_keys": [], "config": {}}, points, overwrite=False)
    grid.prepare_folder(folder, {"fingerprint": "new", "grid_keys": [], "config": {}}, points, overwrite=True)
    assert victim.exists() and json.loads((folder / "sweep.json").read_text())["fingerprint"] == "new"


def test_a_sweep_output_folder_that_is_a_link_is_refused(fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "elsewhere").mkdir()
    (workdir / "sweep").symlink_to(workdir / "elsewhere")
    code, err = mergelit(capsys, *ta_sweep(fixtures_root, workdir, workdir / "sweep"))
    assert_short_error(code, err, str(workdir / "sweep"), "is a link")
    assert not list((workdir / "elsewhere").iterdir())


def test_a_sweep_folder_file_linking_out_is_refused(tmp_path):
    from mergelit import grid

    (tmp_path / "sweep").mkdir()
    write_report(good_report(), tmp_path / "elsewhere.json")
    (tmp_path / "sweep" / "scaling_factor=0.3.json").symlink_to(tmp_path / "elsewhere.json")
    points = grid.grid_points({"model.init_args.scaling_factor": [0.3]})
    with pytest.raises(ValueError, match=r"'scaling_factor=0\.3\.json'.*outside the folder"):
        grid.prepare_folder(tmp_path / "sweep", {"fingerprint": "new"}, points, overwrite=True)


@pytest.mark.parametrize("link", ["report path", "predictions folder"])
def test_a_link_out_of_the_output_folder_is_refused_before_the_merge(link, fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "elsewhere").mkdir()
    out = workdir / "out"
    out.mkdir()
    if link == "report path":
        (out / "r.json").symlink_to(workdir / "elsewhere" / "r.json")
        needles = [str(out / "r.json"), "is a link"]
    else:
        (out / "predictions").symlink_to(workdir / "elsewhere")
        needles = [str(out / "predictions"), "is a link"]
    code, err = mergelit(capsys, *run_args(small_config(fixtures_root, workdir), "--report_save_path", str(out / "r.json"),
                                            "--save_predictions", "true"))
    assert_short_error(code, err, *needles)
    assert not list((workdir / "elsewhere").iterdir())


def test_writing_predictions_through_a_link_is_refused(tmp_path):
    from mergelit.report import write_predictions

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "predictions").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="is a link"):
        write_predictions({"cola": [{"idx": 0, "label": 1, "prediction": 1, "logits": [0.0, 1.0], "loss": 0.3}]}, tmp_path / "predictions")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_compare_refuses_a_report_or_run_that_links_out_of_its_folder(tmp_path, capsys):
    write_report(good_report(), tmp_path / "elsewhere.json")
    run = tmp_path / "runs" / "version_0"
    run.mkdir(parents=True)
    (run / "report.json").symlink_to(tmp_path / "elsewhere.json")
    code, err = mergelit(capsys, "compare", str(run))
    assert_short_error(code, err, "report.json", "outside the folder")
    (tmp_path / "other_run").mkdir()
    write_report(good_report(), tmp_path / "other_run" / "report.json")
    (run / "report.json").unlink()
    run.rmdir()
    run.symlink_to(tmp_path / "other_run")
    code, err = mergelit(capsys, "compare", str(tmp_path / "runs"))
    assert_short_error(code, err, "'version_0'", "outside the folder")
    write_report(good_report(), tmp_path / "plain.json")
    (tmp_path / "out_link").symlink_to(tmp_path / "other_run")
    code, err = mergelit(capsys, "compare", str(tmp_path / "plain.json"), "--output_dir", str(tmp_path / "out_link"))
    assert_short_error(code, err, "out_link", "is a link")


def test_the_tokenizer_fingerprint_does_not_change_once_the_tokenizer_has_tokenized(fixtures_root):
    """The backend keeps its last call's truncation: hashed with it, a sweep's second point saw "another
    tokenizer" than the pool's own."""
    from mergelit.glue import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(str(fixtures_root / "pool" / "pretrained"))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer("a premise", "a hypothesis", truncation=True, max_length=16)
    assert tokenizer_fingerprint(tokenizer) == before == tokenizer_fingerprint(load_tokenizer(str(fixtures_root / "pool" / "cola")))


def test_tokenizer_files_digest_ignores_recorded_call_settings_only(fixtures_root, tmp_path):
    """The quick check before loading a checkpoint's own tokenizer: files equal up to the per-call
    settings an export records (max_length, truncation) are the same tokenizer; another vocabulary
    is not; a folder without tokenizer files has no digest."""
    from mergelit.glue import tokenizer_files_digest

    source = fixtures_root / "pool" / "pretrained"
    config = source / "tokenizer_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    plain, recorded = tmp_path / "plain", tmp_path / "recorded"
    for folder, extra in ((plain, {}), (recorded, {"max_length": 512, "truncation_side": "right", "stride": 0})):
        shutil.copytree(source, folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **extra}))
    assert tokenizer_files_digest(str(recorded)) == tokenizer_files_digest(str(plain)) is not None
    permuted = tokenizer_copy(fixtures_root, tmp_path / "permuted", permute=True)
    same = tokenizer_copy(fixtures_root, tmp_path / "same", permute=False)
    assert tokenizer_files_digest(str(permuted)) != tokenizer_files_digest(str(same))
    assert tokenizer_files_digest(str(tmp_path / "nowhere")) is None


def test_the_tokenizer_fingerprint_follows_the_pad_token(fixtures_root):
    """Computed once per tokenizer, but a changed pad id is another fingerprint."""
    from mergelit.glue import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(str(fixtures_root / "pool" / "pretrained"))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.pad_token = "!"
    assert tokenizer_fingerprint(tokenizer) != before
