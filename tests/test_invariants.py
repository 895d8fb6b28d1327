"""Invariants of every merge method, found by discovery (``mergelit.methods.method_classes``).

A new method file in ``mergelit/methods/`` is run here without editing this file: its config
must exist and parse, ``Method(pool, **Method.recommended)`` must merge the tiny pool into a body
with θ0's keys, shapes and dtypes, finite, without writing into the pool's tensors, the same
bits twice, and ``mergelit test`` with its config must score every task.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mergelit.__main__ import main
from mergelit.glue import GLUEDataModule
from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def quick_arguments(cls: type) -> dict:
    """The method's own small budget (``quick``: steps, examples), so every method runs in seconds."""
    return dict(cls.quick)
METHODS = method_classes()
IDS = [cls.__name__ for cls in METHODS]


def config_of(cls: type) -> Path:
    """The shipped config whose ``class_path`` names ``cls``."""
    for path in sorted((CONFIGS / "methods").glob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if model.get("class_path") in (f"mergelit.methods.{cls.__name__}", f"{cls.__module__}.{cls.__name__}"):
            return path
    raise AssertionError(f"No configs/methods/*.yaml has class_path mergelit.methods.{cls.__name__}")


def make(cls: type, pool: ModelPool, cache: Path) -> MergeMethod:
    """``cls(pool, **recommended)``; statistics caches under ``cache``."""
    kwargs = {**cls.recommended, **quick_arguments(cls)}
    if "task" in inspect.signature(cls.__init__).parameters:  # one task's own body (Individual)
        kwargs.setdefault("task", pool.tasks[0])
    if "cache_dir" in inspect.signature(cls.__init__).parameters:
        kwargs["cache_dir"] = str(cache)
    return cls(pool, **kwargs)


def merged_bodies(method: MergeMethod, fixtures_root: Path, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Prepare (statistics, adaptation) and merge: {task: body} (the same body for every task unless task-aware)."""
    config = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    data = GLUEDataModule(
        tasks=method.tasks, tokenizer=method.pool.tokenizer_path, path=config["data"]["path"],
        batch_size=16, cache_dir=str(tmp_path / "tokenized"),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    torch.manual_seed(0)
    method.prepare(trainer, data)
    method.setup("test")
    return {task: {k: v.clone() for k, v in method.body_for(task).state_dict().items()} for task in method.tasks}


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


def test_discovery_finds_every_method_file():
    names = {cls.__name__ for cls in METHODS}
    assert {"TaskArithmetic", "TiesMerging", "SimpleAverage", "FisherMerging", "RegMean", "SimpleEnsemble"} <= names
    for cls in METHODS:
        assert "display_name" in vars(cls), f"{cls.__name__} must set display_name (the name tables print)"
        assert cls.kind in ("merged", "task-aware", "ensemble")
        assert set(cls.quick) <= set(inspect.signature(cls.__init__).parameters), f"{cls.__name__}.quick names no argument"


@pytest.mark.parametrize("cls", [c for c in METHODS if c.search], ids=[c.__name__ for c in METHODS if c.search])
def test_search_range_is_one_argument_whose_every_value_builds(cls, pool):
    """``model: tuned`` sweeps one argument per method; every value of its range is valid with the
    method's recommended arguments (a tuned comparison never fails on its own grid)."""
    assert len(cls.search) == 1
    (name, values), = cls.search.items()
    assert name in inspect.signature(cls.__init__).parameters and len(values) >= 3
    assert values == sorted(values) and len(set(values)) == len(values)
    for value in values:
        assert cls(pool, **{**cls.recommended, name: value}).hparams[name] == value


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_float_arguments_refuse_nan_and_inf(cls, pool):
    """Every float argument refuses NaN and inf in the constructor, with a message naming it."""
    checked = 0
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if isinstance(parameter.default, float) and not isinstance(parameter.default, bool):
            for value in (math.nan, math.inf):
                kwargs = {"task": pool.tasks[0]} if "task" in inspect.signature(cls.__init__).parameters else {}
                with pytest.raises(ValueError, match=name):
                    cls(pool, **{**kwargs, name: value})
            checked += 1
    assert checked or not any(isinstance(p.default, float) for p in inspect.signature(cls.__init__).parameters.values())


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_config_exists_opens_with_its_command_and_parses(cls):
    from mergelit.cli import MergeCLI

    path = config_of(cls)
    assert path.read_text().startswith("#"), f"{path} must open with a comment giving the command that runs it"
    cli = MergeCLI(args=["-c", str(CONFIGS / "gpt2_glue.yaml"), "-c", str(path)])
    assert type(cli.model) is cls
    assert not cli.model.pool._checkpoints  # parsing reads no checkpoint


EXPORTABLE = [c for c in METHODS if c.exportable]


@pytest.mark.parametrize("cls", EXPORTABLE, ids=[c.__name__ for c in EXPORTABLE])
def test_merge_keeps_keys_shapes_dtypes_is_finite_and_deterministic(cls, pool, fixtures_root, tmp_path):
    pretrained = pool.pretrained_body()
    before = {task: pool.finetuned_body(task) for task in pool.tasks}

    first = merged_bodies(make(cls, pool, tmp_path / "a"), fixtures_root, tmp_path / "a")
    second = merged_bodies(make(cls, pool, tmp_path / "b"), fixtures_root, tmp_path / "b")

    for task, body in first.items():
        assert list(body) == list(pretrained), f"{cls.__name__}: keys of {task}'s body"
        for key, tensor in body.items():
            assert tensor.shape == pretrained[key].shape and tensor.dtype == pretrained[key].dtype, key
            assert torch.isfinite(tensor).all(), f"{cls.__name__}: non-finite {key} for {task}"
            assert torch.equal(tensor, second[task][key]), f"{cls.__name__}: {key} differs between two runs"
    # No method writes into the checkpoints it reads.
    for key, tensor in pool.pretrained_body().items():
        assert torch.equal(tensor, pretrained[key]), key
    for task in pool.tasks:
        for key, tensor in pool.finetuned_body(task).items():
            assert torch.equal(tensor, before[task][key]), f"{cls.__name__} modified {task}'s {key}"


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_mergelit_test_end_to_end(cls, fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    extra = ["--model.init_args.cache_dir", str(tmp_path / "cache")] if "cache_dir" in inspect.signature(cls.__init__).parameters else []
    for name, value in quick_arguments(cls).items():
        extra += [f"--model.init_args.{name}", str(value)]
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(config_of(cls)),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path), *extra])
    report = json.loads(report_path.read_text())
    assert [key for key in report if key in (*TASKS, "average")] == [*TASKS, "average"]  # extra entries may follow
    for task in TASKS:
        assert 0 <= report[task]["accuracy"] <= 1 and math.isfinite(report[task]["loss"]), task
