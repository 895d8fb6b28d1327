"""Choosing a sweep's point without the reported labels: the dev and agreement criteria, and the
selection step.

Published GPT-2/GLUE merging numbers pick λ (TIES's threshold, DARE's ratio ...) by reading the
accuracy off the GLUE validation sets they are reported on: tuning on the test set, an *oracle*.
``mergelit sweep --sweep.select_on dev|agreement`` scores every grid point on a criterion that
does not read the reported labels, picks each method's point with the highest value (ties: the
first in grid order), and scores only that point on the validation rows (**selected**);
``--sweep.oracle true`` also scores every point there, for the best one (**oracle**).

- ``dev``: accuracy (unweighted mean over tasks, each task under its own head) on the labeled
  **dev rows** (``GLUEDataModule.dev_indices``): by default a seeded 10 % of each validation set
  (``data.dev_source: validation``), held out of scoring, so the choice is out of sample for the
  experts and the reported accuracy is on the other 90 %; or ``data.dev_size`` rows of ``train``
  (``data.dev_source: train``), the rows the experts were fine-tuned on: **in-sample for the
  experts**, which tends to favour points close to them.
- ``agreement``: label-free. On the dev rows' *texts*, the fraction of rows where the merged
  model's prediction (task t's head) equals expert t's (fine-tuned body t under head t, i.e.
  ``Individual(pool, task=t)``), averaged over tasks. No label of any split is read.

Both run over the dev rows only, in a plain loop under ``torch.inference_mode`` (no
``trainer.test``: loggers and report callbacks see only validation runs), and on every process
the same rows (the dev split is small): each rank computes the same value.

A sweep with selection runs every point with ``data.hold_out_dev: true``: the dev rows are
then held out of everything else that reads their split (scoring under ``dev_source:
validation``; statistics and adaptation under ``train``), so a point's report equals
``mergelit test ... --data.hold_out_dev true``.

**The selection step** is its own step over finished points: each point's criterion sits in
``<point>.criterion.json`` beside where its report goes; ``write_selection`` reads them, picks
each method group's point and writes ``selection.json``. It never rewrites a report.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelit.errors import BadData
from mergelit.glue import GLUEDataModule, rows_hash
from mergelit.methods.base import MergeMethod
from mergelit.methods.individual import Individual
from mergelit.pool import ModelPool
from mergelit.tables import CRITERION_SUFFIX, SELECTION, inside, read_json

CRITERIA = ("dev", "agreement")
"""The values of ``sweep.select_on`` that select (``none`` does not)."""

TITLES = {"dev": "dev accuracy", "agreement": "agreement"}
"""The criterion's column header in sweep tables."""

IN_SAMPLE = "in-sample for the experts"
"""What tables call a choice made on train rows: the rows the fine-tuned models were trained on."""


def _rows(dev_source: str) -> str:
    return f"{dev_source} rows" + (f", {IN_SAMPLE}" if dev_source == "train" else "")


def labels_used(select_on: str, dev_source: str) -> str:
    """Which labels the criterion reads: ``dev labels (validation rows)``, or ``none`` (agreement)."""
    return f"dev labels ({_rows(dev_source)})" if select_on == "dev" else "none"


def data_read(select_on: str, dev_source: str) -> str:
    """What a selected row read beside the method's own data, for the leaderboard's ``data`` column:
    ``dev labels (validation rows)``, ``dev inputs (train rows, in-sample for the experts)`` ..."""
    return f"dev labels ({_rows(dev_source)})" if select_on == "dev" else f"dev inputs ({_rows(dev_source)})"


def chosen_on(select_on: str, dev_source: str) -> str:
    """How table labels name the choice: ``dev``, or ``dev, in-sample for the experts`` (train rows)."""
    return f"{select_on}, {IN_SAMPLE}" if dev_source == "train" else select_on


def dev_record(datamodule: GLUEDataModule, tasks: Sequence[str]) -> dict[str, Any]:
    """The dev rows, as ``selection.json`` records them: source, split and rows per task, seed, the
    fraction (validation) or size (train), the row numbers and a hash of all of it."""
    indices = {task: datamodule.dev_indices(task) for task in tasks}
    source = datamodule.dev_source
    return {
        "source": source,
        "splits": {task: datamodule.dev_split(task) for task in tasks},
        **({"fraction": datamodule.dev_fraction} if source == "validation" else {"size": datamodule.dev_size}),
        "seed": datamodule.dev_seed,
        "rows": {task: len(rows) for task, rows in indices.items()},
        "sha256": rows_hash([source, *(rows_hash(indices[task]) for task in tasks)]),
        "indices": indices,
    }


@torch.inference_mode()
def predictions(model: MergeMethod, loader: DataLoader, task: str) -> Tensor:
    """``model``'s predicted class for every row of ``loader`` (task ``task``'s head), in loader order.

    Reads only ``input_ids`` and ``attention_mask`` of each batch: never its labels.
    """
    was_training = model.training
    model.eval()
    try:
        out = [
            model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device), task).argmax(-1).cpu()
            for batch in loader
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)


def dev_labels(loader: DataLoader) -> Tensor:
    """The labels of the dev rows, in loader order (the ``dev`` criterion only)."""
    return torch.cat([batch["labels"] for batch in loader])


class CriterionScorer:
    """Scores merged models on ``select_on`` over the dev rows; holds the experts' dev predictions.

    Args:
        select_on: ``dev`` or ``agreement``.
    """

    def __init__(self, select_on: str):
        if select_on not in CRITERIA:
            raise ValueError(f"select_on must be one of {', '.join(CRITERIA)}, got {select_on!r}.")
        self.select_on = select_on
        self._experts: dict[tuple, Tensor] = {}  # (pool, task, dev rows) -> expert predictions

    def expert_predictions(self, pool: ModelPool, datamodule: GLUEDataModule, task: str) -> Tensor:
        """Expert ``task``'s predictions on ``task``'s dev rows (computed once per pool and dev split)."""
        key = (id(pool), task, tuple(datamodule.dev_indices(task)), datamodule.max_length)
        if key not in self._experts:
            expert = Individual(pool, task=task)
            expert.setup("test")
            self._experts[key] = predictions(expert, datamodule.dev_dataloader(task), task)
        return self._experts[key]

    def score(self, method: MergeMethod, datamodule: GLUEDataModule) -> dict[str, Any]:
        """``{"select_on", "value", "per_task"}`` of ``method`` (merged already: after ``setup``)."""
        if not isinstance(datamodule, GLUEDataModule):
            raise TypeError(f"Selection needs the GLUEDataModule (for the dev split), got {type(datamodule).__name__}.")
        method.setup("test")  # merges once; nothing if the validation test has merged already
        per_task = {}
        for task in method.tasks:
            loader = datamodule.dev_dataloader(task)
            predicted = predictions(method, loader, task)
            reference = dev_labels(loader) if self.select_on == "dev" else self.expert_predictions(method.pool, datamodule, task)
            per_task[task] = (predicted == reference).double().mean().item()
        return {"select_on": self.select_on, "value": sum(per_task.values()) / len(per_task), "per_task": per_task}


def select(names: Sequence[str], values: Mapping[str, float]) -> str:
    """The name with the highest criterion value; ties go to the first in ``names`` (grid order)."""
    best = names[0]
    for name in names[1:]:
        if values[name] > values[best]:
            best = name
    return best


# ---- criterion files and the selection step --------------------------------------------------
def criterion_path(report_path: Path) -> Path:
    """``scaling_factor=0.3.json`` -> ``scaling_factor=0.3.criterion.json`` (the point's criterion value)."""
    return report_path.with_name(report_path.name.removesuffix(".json") + CRITERION_SUFFIX)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_criterion(path: Path) -> Optional[dict[str, Any]]:
    """The criterion file at ``path``, or None when there is none; a truncated or damaged one (not
    JSON, or without its criterion, value, per-task values and dev rows' hash) is ``BadData`` naming it."""
    if not (path.exists() or path.is_symlink()):
        return None
    inside(path.parent, path.name, f"The sweep folder {str(path.parent)!r}")
    fix = "the sweep scores its point again."
    scored = read_json(path, "The criterion file", fix)
    per_task = scored.get("per_task") if isinstance(scored, dict) else None
    if not (isinstance(scored.get("select_on") if isinstance(scored, dict) else None, str) and _finite(scored.get("value"))
            and isinstance(per_task, dict) and per_task and all(_finite(v) for v in per_task.values())
            and isinstance(scored.get("dev_sha256"), str)):
        raise BadData(f"The criterion file {str(path)!r} is damaged (expected select_on, value, per_task and dev_sha256); {fix}")
    return scored


def read_criterion(report_path: Path, select_on: str, dev: Mapping[str, Any], rescore: bool = False) -> Optional[dict[str, Any]]:
    """The point's stored criterion, or None when missing or computed for another criterion or dev rows.

    A damaged file raises ``BadData`` naming it, unless ``rescore`` (a sweep resuming: it warns,
    naming the file, and the point is scored again)."""
    try:
        scored = load_criterion(criterion_path(report_path))
    except BadData as error:
        if not rescore:
            raise
        warnings.warn(str(error), stacklevel=2)
        return None
    if scored is None or scored.get("select_on") != select_on or scored.get("dev_sha256") != dev["sha256"]:
        return None
    return scored


def check_dev_split(datamodule: GLUEDataModule, tasks: Sequence[str]) -> None:
    """Before any point runs: every task's dev split can be drawn. A split of fewer than 2 rows
    cannot give one (train: at most half is drawn; validation: at least one row must be left to
    score): refused naming the task, the split and its rows, with the fix that applies."""
    for task in tasks:
        split = datamodule.dev_split(task)
        rows = len(datamodule.raw(task, split))
        if datamodule.dev_indices(task):
            continue
        if datamodule.dev_source == "train":
            fix = ("a dev split of train rows takes at most half of them (min(data.dev_size, rows // 2)), so it needs at "
                   "least 2 train rows; use --data.dev_source validation, or a train split with more rows")
        else:
            fix = ("a dev split of validation rows holds out at least one and leaves at least one to score, so it needs at "
                   "least 2 rows; use --data.dev_source train, or a validation split with more rows")
        raise BadData(
            f"Selection needs a dev split, but task {task!r} split {split!r} in {datamodule.path!r} has {rows} row(s): {fix}."
        )


def write_selection(
    folder: Path, groups: Mapping[str, Sequence[str]], select_on: str, dev: Mapping[str, Any]
) -> dict[str, Any]:
    """The selection step: read every point's criterion file (``groups``: method group -> its points
    in grid order), pick each group's point (``select``) and write ``selection.json``; return it."""
    from mergelit.report import atomic_write_text

    values = {}
    for names in groups.values():
        for name in names:
            scored = read_criterion(folder / f"{name}.json", select_on, dev)
            if scored is None:
                raise BadData(f"Sweep folder {folder}: point {name!r} has no {select_on} criterion for these dev rows.")
            values[name] = scored["value"]
    chosen = {group: select(list(names), values) for group, names in groups.items()}
    result = {
        "select_on": select_on,
        "chosen_on": chosen_on(select_on, dev["source"]),
        "labels_used": labels_used(select_on, dev["source"]),
        "data_read": data_read(select_on, dev["source"]),
        "groups": {group: {"points": list(names), "selected": chosen[group]} for group, names in groups.items()},
        "selected_points": list(chosen.values()),
        "criterion": values,
        "dev": dict(dev),
    }
    atomic_write_text(folder / SELECTION, json.dumps(result, indent=2) + "\n")
    return result
