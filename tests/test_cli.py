"""End to end: `mergelit test` on the tiny offline pool, one run per method config, and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.cli import MergeCLI
from mergelit.tasks import GLUE_TASKS, TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRUNK_METHODS = ["pretrained", "individual", "simple_average", "task_arithmetic", "ties_merging"]


def run_test(config: Path, method: str, tmp_path: Path, *extra: str) -> dict:
    report_path = tmp_path / f"{method}.json"
    main(["test", "-c", str(config), "-c", str(CONFIGS / "methods" / f"{method}.yaml"),
          "--report_save_path", str(report_path), *extra])
    return json.loads(report_path.read_text())


@pytest.mark.parametrize("method", TRUNK_METHODS)
def test_every_method_end_to_end(method, fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run_test(fixtures_root / "config.yaml", method, tmp_path)
    assert list(report)[: len(TASKS) + 1] == [*TASKS, "average"]  # then mnli_mismatched, protocol
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
        assert report[task]["loss"] > 0
    mean = sum(report[t]["accuracy"] for t in TASKS) / len(TASKS)
    assert report["average"]["accuracy"] == pytest.approx(mean)
    # The same report also lands in the run's log dir.
    logged = sorted(tmp_path.glob("lightning_logs/version_*/report.json"))
    assert len(logged) == 1 and json.loads(logged[0].read_text()) == report


def test_runs_are_deterministic(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_test(fixtures_root / "config.yaml", "ties_merging", tmp_path / "a")
    second = run_test(fixtures_root / "config.yaml", "ties_merging", tmp_path / "b")
    # Everything but the measured costs (wall times, memory), which differ from run to run.
    for report in (first, second):
        del report["protocol"]["costs"]
    assert first == second


def test_method_arguments_change_the_result(fixtures_root, tmp_path, monkeypatch):
    """λ = 0 in Task Arithmetic is the pretrained body: the same report as `pretrained`."""
    monkeypatch.chdir(tmp_path)
    config = fixtures_root / "config.yaml"
    zero = run_test(config, "task_arithmetic", tmp_path / "ta0", "--model.init_args.scaling_factor", "0.0")
    pretrained = run_test(config, "pretrained", tmp_path / "pre")
    for task in TASKS:
        assert zero[task]["accuracy"] == pretrained[task]["accuracy"]
        assert zero[task]["loss"] == pytest.approx(pretrained[task]["loss"], rel=1e-6)


def test_exported_checkpoint_reproduces_the_accuracy(fixtures_root, tmp_path, monkeypatch):
    """DIR/<task>/ loads in plain transformers and gives mergelit's accuracy on that task."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mergelit.glue import GLUEDataModule

    monkeypatch.chdir(tmp_path)
    export = tmp_path / "merged"
    report = run_test(fixtures_root / "config.yaml", "task_arithmetic", tmp_path,
                      "--merged_model_save_path", str(export))
    assert sorted(p.name for p in export.iterdir()) == sorted(TASKS)
    for task in ("mnli", "rte"):
        folder = export / task
        assert list(folder.glob("*.safetensors"))
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.num_labels == GLUE_TASKS[task].num_labels
        data = GLUEDataModule(tasks=[task], tokenizer=str(folder), path=str(fixtures_root / "glue"), cache_dir=None)
        raw = data.raw(task, GLUE_TASKS[task].eval_split)
        fields = GLUE_TASKS[task].text_fields
        correct = 0
        with torch.no_grad():
            for start in range(0, len(raw), 16):
                rows = raw[start : start + 16]
                batch = tokenizer(*[rows[f] for f in fields], padding=True, truncation=True,
                                  max_length=512, return_tensors="pt")
                logits = model(**batch).logits
                correct += (logits.argmax(-1) == torch.tensor(rows["label"])).sum().item()
        assert correct / len(raw) == report[task]["accuracy"]


def test_every_method_config_parses():
    """Each shipped method file combines with the real-hub run config (nothing is loaded)."""
    for method in sorted((CONFIGS / "methods").glob("*.yaml")):
        assert method.read_text().startswith("#"), f"{method.name} must open with the command that runs it"
        cli = MergeCLI(args=["-c", str(CONFIGS / "gpt2_glue.yaml"), "-c", str(method)])
        assert cli.model.pool.tasks == list(TASKS)
        assert cli.datamodule.tasks == list(TASKS)
        assert cli.datamodule.tokenizer_path == "gpt2"
        assert cli.model._body is None and not cli.model.pool._checkpoints  # parsing never merges or reads weights


def assert_refused(call, message: str, capsys) -> None:
    """The call fails with an error (raised, or printed by the argument parser) naming ``message``."""
    with pytest.raises((ValueError, KeyError, SystemExit)) as error:
        call()
    text = str(error.value) + capsys.readouterr().err
    assert message in text


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--model.init_args.scaling_factor=nan", "scaling_factor"),
        ("--model.init_args.scaling_factor=inf", "scaling_factor"),
    ],
)
def test_bad_scaling_factor_is_refused_before_loading(argument, message, fixtures_root, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    call = lambda: main(["test", "-c", str(fixtures_root / "config.yaml"), "-c",  # noqa: E731
                         str(CONFIGS / "methods" / "task_arithmetic.yaml"), argument])
    assert_refused(call, message, capsys)
    assert not list(tmp_path.glob("lightning_logs/version_*/report.json"))


def test_unknown_task_in_pool_is_named(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = fixtures_root / "config.yaml"
    call = lambda: MergeCLI(args=["-c", str(config), "-c", str(CONFIGS / "methods" / "pretrained.yaml"),  # noqa: E731
                                  "--pool.finetuned", '{"colaa": "x"}'])
    assert_refused(call, "colaa", capsys)


def test_individual_with_a_task_outside_the_pool_is_named(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    call = lambda: main(["test", "-c", str(fixtures_root / "config.yaml"), "-c",  # noqa: E731
                         str(CONFIGS / "methods" / "individual.yaml"), "--model.init_args.task", "wnli"])
    assert_refused(call, "wnli", capsys)


def test_top_level_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("mergelit test", "mergelit sweep", "mergelit compare", "mergelit fit", "mergelit demo"):
        assert command in out
