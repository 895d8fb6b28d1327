"""mergelit from Python (``mergelit/__init__.py`` shows an example): merge a pool, build the classifiers,
score them, export them. Every function runs what ``mergelit test`` runs, in the same order: the
method's ``prepare`` (statistics, adaptation: it needs ``data``), the merge, the scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import lightning as L
import torch
from torch import Tensor, nn

from mergelit.errors import MergelitError
from mergelit.export import Provenance, reproducible_config, save_merged
from mergelit.glue import GLUEDataModule
from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool
from mergelit.report import Report, ReportWriter, plain_value

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "methods"


def method_names() -> dict[str, type[MergeMethod]]:
    """Every name ``method`` accepts: class names (``TiesMerging``), module names (``ties``) and, in a
    source checkout, the shipped config names (``ties_merging``)."""
    names: dict[str, type[MergeMethod]] = {}
    classes = method_classes()
    for cls in classes:
        names[cls.__name__] = cls
        names.setdefault(cls.__module__.rsplit(".", 1)[-1], cls)
    if CONFIGS.is_dir():
        from mergelit.configfile import load_yaml

        by_path = {f"mergelit.methods.{cls.__name__}": cls for cls in classes}
        for path in sorted(CONFIGS.glob("*.yaml")):
            model = (load_yaml(path) or {}).get("model") or {}
            if model.get("class_path") in by_path:
                names.setdefault(path.stem, by_path[model["class_path"]])
    return names


def method(pool: ModelPool, name: Union[str, type[MergeMethod]], **arguments: Any) -> MergeMethod:
    """A merge method of ``pool``: ``name`` is a method class or one of ``method_names()``;
    ``arguments`` are its init arguments."""
    if isinstance(name, type) and issubclass(name, MergeMethod):
        return name(pool, **arguments)
    names = method_names()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        known = ", ".join(sorted(set(c.__name__ for c in names.values())))
        raise MergelitError(f"No merge method is called {name!r}.{hint} The methods: {known}.")
    return names[name](pool, **arguments)


def _trainer(trainer: Optional[L.Trainer], progress: bool = False) -> L.Trainer:
    """The given Trainer, or a one-process CPU/GPU one whose report writer writes no file."""
    if trainer is not None:
        return trainer
    return L.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, use_distributed_sampler=False, callbacks=[ReportWriter(log_dir=False)],
    )


def prepare(method_: MergeMethod, data: Optional[GLUEDataModule] = None, trainer: Optional[L.Trainer] = None) -> MergeMethod:
    """Run ``method_.prepare`` (statistics, adaptation) as ``mergelit test`` does; nothing for data-free methods."""
    if type(method_).prepare is not MergeMethod.prepare:
        if data is None:
            raise MergelitError(
                f"{type(method_).__name__} reads data ({method_.data}): pass data=mergelit.GLUEDataModule(...)."
            )
        method_.prepare(_trainer(trainer), data)
    return method_


def merge(
    pool: ModelPool, method_: Union[MergeMethod, str], data: Optional[GLUEDataModule] = None,
    trainer: Optional[L.Trainer] = None, **arguments: Any,
) -> dict[str, Tensor]:
    """The merged body (a ``GPT2Model`` state dict) of ``method_`` (an instance, or a name plus its
    ``arguments``), after its ``prepare``. A task-aware method has no single body: use ``classifiers``."""
    if not isinstance(method_, MergeMethod):
        method_ = method(pool, method_, **arguments)
    elif arguments:
        raise MergelitError("Give arguments with a method's name, not with an instance (they are its init arguments).")
    if type(method_).merge_tensor is MergeMethod.merge_tensor:  # EMR, TALL masks, the ensemble
        raise MergelitError(
            f"{method_.display_name} has no single merged body ({method_.kind}); use mergelit.classifiers(pool, method) "
            f"for the model of each task."
        )
    prepare(method_, data, trainer)
    return method_.merge()


def classifiers(
    pool: ModelPool, body_or_method: Union[Mapping[str, Tensor], MergeMethod], data: Optional[GLUEDataModule] = None,
    trainer: Optional[L.Trainer] = None,
) -> dict[str, nn.Module]:
    """``{task: GPT2ForSequenceClassification}``: each task's head on the merged body (a state dict, or
    a method, prepared first); a task-aware method gives each task its own body."""
    from transformers import GPT2ForSequenceClassification

    if isinstance(body_or_method, MergeMethod):
        prepare(body_or_method, data, trainer)
        if not body_or_method.exportable:
            raise MergelitError(f"{body_or_method.display_name} has no merged body: it runs every fine-tuned model.")
        body_or_method.setup("test")
        body_of = lambda task: body_or_method.body_for(task).state_dict()  # noqa: E731
    else:
        body = dict(body_or_method)
        body_of = lambda task: body  # noqa: E731
    models = {}
    for task in pool.tasks:
        with torch.device("meta"):
            model = GPT2ForSequenceClassification(pool.task_config(task))
        state = {f"transformer.{k}": v.detach().cpu().clone() for k, v in body_of(task).items()}
        state["score.weight"] = pool.head(task).detach().cpu().clone()
        model.load_state_dict(state, strict=True, assign=True)
        models[task] = model.eval()
    return models


class Classifiers(MergeMethod):
    """Given classifiers (``{task: GPT2ForSequenceClassification}``) scored as a method: task t with
    classifier t's body and head."""

    display_name = "Given classifiers"
    kind = "task-aware"

    def __init__(self, pool: ModelPool, models: Mapping[str, nn.Module]):
        super().__init__(pool)
        missing = [t for t in pool.tasks if t not in models]
        if missing:
            raise MergelitError(f"No classifier for task(s) {missing}; give one per task of the pool.")
        self.models = dict(models)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.heads:
            return
        self.heads = nn.ModuleDict({task: self.models[task].score for task in self.tasks})
        self.pad_token_ids = {task: self.pool.task_config(task).pad_token_id for task in self.tasks}
        self.bodies = nn.ModuleDict({task: self.models[task].transformer.eval() for task in self.tasks})

    def body_for(self, task: str) -> nn.Module:
        return self.bodies[task]


def evaluate(
    method_or_classifiers: Union[MergeMethod, Mapping[str, nn.Module]], data: GLUEDataModule,
    trainer: Optional[L.Trainer] = None, pool: Optional[ModelPool] = None, save_predictions: bool = False,
    report_path: Optional[str] = None, progress: bool = False,
) -> Report:
    """Prepare, merge and score as ``mergelit test`` does; returns its report. ``method_or_classifiers``:
    a method, or ``{task: model}`` from ``classifiers`` (with their ``pool``). Writes a file only if ``report_path``."""
    from mergelit.run import run_test

    if isinstance(method_or_classifiers, MergeMethod):
        method_ = method_or_classifiers
    else:
        if pool is None:
            raise MergelitError("Scoring given classifiers needs their pool: evaluate(models, data, pool=pool).")
        method_ = Classifiers(pool, method_or_classifiers)
    return run_test(_trainer(trainer, progress), method_, data, report_save_path=report_path, quiet=True,
                    save_predictions=save_predictions)


def export_merged(method_: MergeMethod, folder: Union[str, Path], report: Optional[Report] = None) -> list[Path]:
    """Write ``folder/<task>/`` checkpoints of ``method_`` (merged or task-aware), each with its model
    card; ``report`` (from ``evaluate``) puts the accuracies and the protocol in the cards."""
    if not method_.exportable:
        raise MergelitError(f"{method_.display_name} has no merged body to export.")
    method_.setup("test")
    pool = method_.pool
    config = {
        "pool": {"pretrained": pool.pretrained_path, "finetuned": dict(pool.finetuned_paths), "tokenizer": pool.tokenizer_path},
        "model": {"class_path": f"mergelit.methods.{type(method_).__name__}", "init_args": plain_value(dict(method_.hparams))},
    }
    provenance = Provenance(report or {}, reproducible_config(config), None)
    return save_merged(folder, pool, lambda task: method_.body_for(task).state_dict(), provenance)
