"""Choosing a sweep's point without the reported labels (``--sweep.select_on dev|agreement``, docs/sweeps.md).

Both criteria score the dev rows only, in a plain loop under ``torch.inference_mode`` (no
``trainer.test``: loggers and report callbacks see only validation runs), the same rows on every
process. ``write_selection`` picks each method group's point from the ``<point>.criterion.json``
files and writes ``selection.json``, never rewriting a report.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelit.errors import BadData, is_number
from mergelit.glue import GLUEDataModule, rows_hash
from mergelit.methods.base import MergeMethod
from mergelit.methods.individual import Individual
from mergelit.report import atomic_write_text
from mergelit.tables import CRITERION_SUFFIX, SELECTION, inside, read_json

CRITERIA = ("dev", "agreement")  # the values of sweep.select_on that select
TITLES = {"dev": "dev accuracy", "agreement": "agreement"}  # the criterion's column header in sweep tables
# What tables call a choice made on train rows: the rows the fine-tuned models were trained on.
IN_SAMPLE = "in-sample for the experts"


def dev_record(datamodule: GLUEDataModule, tasks: Sequence[str]) -> dict[str, Any]:
    """The dev rows, as ``selection.json`` records them: source, split and rows per task, seed, the
    fraction (validation) or size (train), the row numbers and a hash of all of it. A task whose split
    is too small to draw them from (under 2 rows) is ``BadData`` naming it, with the fix that applies."""
    source = datamodule.dev_source
    for task in tasks:
        split = datamodule.dev_split(task)
        rows = len(datamodule.raw(task, split))
        if datamodule.dev_indices(task):
            continue
        if source == "train":
            fix = ("a dev split of train rows takes at most half of them (min(data.dev_size, rows // 2)), so it needs at "
                   "least 2 train rows; use --data.dev_source validation, or a train split with more rows")
        else:
            fix = ("a dev split of validation rows holds out at least one and leaves at least one to score, so it needs at "
                   "least 2 rows; use --data.dev_source train, or a validation split with more rows")
        raise BadData(
            f"Selection needs a dev split, but task {task!r} split {split!r} in {datamodule.path!r} has {rows} row(s): {fix}."
        )
    indices = {task: datamodule.dev_indices(task) for task in tasks}
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
    """``model``'s predicted class for every row of ``loader`` (task ``task``'s head), in loader order;
    it reads only ``input_ids`` and ``attention_mask``, never the labels."""
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


class CriterionScorer:
    """Scores merged models on ``select_on`` (``dev`` or ``agreement``) over the dev rows; holds the
    experts' dev predictions (expert t: ``Individual(pool, task=t)``)."""

    def __init__(self, select_on: str):
        if select_on not in CRITERIA:
            raise ValueError(f"select_on must be one of {', '.join(CRITERIA)}, got {select_on!r}.")
        self.select_on = select_on
        self._experts: dict[tuple, Tensor] = {}  # (pool, task, dev rows) -> expert predictions

    def score(self, method: MergeMethod, datamodule: GLUEDataModule) -> dict[str, Any]:
        """``{"select_on", "value", "per_task"}`` of ``method``: the mean over tasks of the fraction of
        dev rows where it predicts the label (``dev``) or what expert t predicts (``agreement``)."""
        if not isinstance(datamodule, GLUEDataModule):
            raise TypeError(f"Selection needs the GLUEDataModule (for the dev split), got {type(datamodule).__name__}.")
        method.setup("test")  # merges once; nothing if the validation test has merged already
        per_task = {}
        for task in method.tasks:
            loader = datamodule.dev_dataloader(task)
            predicted = predictions(method, loader, task)
            if self.select_on == "dev":
                reference = torch.cat([batch["labels"] for batch in loader])
            else:  # expert t's predictions, computed once per pool and dev rows
                key = (id(method.pool), task, tuple(datamodule.dev_indices(task)), datamodule.max_length)
                if key not in self._experts:
                    expert = Individual(method.pool, task=task)
                    expert.setup("test")
                    self._experts[key] = predictions(expert, datamodule.dev_dataloader(task), task)
                reference = self._experts[key]
            per_task[task] = (predicted == reference).double().mean().item()
        return {"select_on": self.select_on, "value": sum(per_task.values()) / len(per_task), "per_task": per_task}


def select(names: Sequence[str], values: Mapping[str, float]) -> str:
    """The name with the highest criterion value; ties go to the first in ``names`` (grid order)."""
    best = names[0]
    for name in names[1:]:
        if values[name] > values[best]:
            best = name
    return best


def criterion_path(report_path: Path) -> Path:
    """``scaling_factor=0.3.json`` -> ``scaling_factor=0.3.criterion.json``."""
    return report_path.with_name(report_path.name.removesuffix(".json") + CRITERION_SUFFIX)


def read_criterion(report_path: Path, select_on: str, dev: Mapping[str, Any], rescore: bool = False) -> Optional[dict[str, Any]]:
    """The point's stored criterion, or None when missing or computed for another criterion or dev rows;
    a damaged file is ``BadData`` naming it, unless ``rescore`` (a resuming sweep warns and scores again)."""
    path = criterion_path(report_path)
    if not (path.exists() or path.is_symlink()):
        return None
    fix = "the sweep scores its point again."
    try:
        inside(path.parent, path.name, f"The sweep folder {str(path.parent)!r}")
        scored = read_json(path, "The criterion file", fix)
        per_task = scored.get("per_task") if isinstance(scored, dict) else None
        select_on = scored.get("select_on") if isinstance(scored, dict) else None
        if not (isinstance(select_on, str) and is_number(scored.get("value"), finite=True)
                and isinstance(per_task, dict) and per_task and all(is_number(v, finite=True) for v in per_task.values())
                and isinstance(scored.get("dev_sha256"), str)):
            raise BadData(f"The criterion file {str(path)!r} is damaged (expected select_on, value, per_task and dev_sha256); {fix}")
    except BadData as error:
        if not rescore:
            raise
        warnings.warn(str(error), stacklevel=2)
        return None
    if scored.get("select_on") != select_on or scored.get("dev_sha256") != dev["sha256"]:
        return None
    return scored


def write_selection(
    folder: Path, groups: Mapping[str, Sequence[str]], select_on: str, dev: Mapping[str, Any]
) -> dict[str, Any]:
    """The selection step: read every point's criterion file (``groups``: method group -> its points
    in grid order), pick each group's point (``select``) and write ``selection.json``; return it."""
    values = {}
    for names in groups.values():
        for name in names:
            scored = read_criterion(folder / f"{name}.json", select_on, dev)
            if scored is None:
                raise BadData(f"Sweep folder {folder}: point {name!r} has no {select_on} criterion for these dev rows.")
            values[name] = scored["value"]
    chosen = {group: select(list(names), values) for group, names in groups.items()}
    rows = f"{dev['source']} rows" + (f", {IN_SAMPLE}" if dev["source"] == "train" else "")
    result = {
        "select_on": select_on,
        "chosen_on": f"{select_on}, {IN_SAMPLE}" if dev["source"] == "train" else select_on,
        "labels_used": f"dev labels ({rows})" if select_on == "dev" else "none",
        "data_read": f"dev labels ({rows})" if select_on == "dev" else f"dev inputs ({rows})",
        "groups": {group: {"points": list(names), "selected": chosen[group]} for group, names in groups.items()},
        "selected_points": list(chosen.values()),
        "criterion": values,
        "dev": dict(dev),
    }
    atomic_write_text(folder / SELECTION, json.dumps(result, indent=2) + "\n")
    return result
