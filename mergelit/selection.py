"""Choosing a sweep's point without the validation labels: the dev criterion and the agreement criterion.

Published GPT-2/GLUE merging numbers pick λ (TIES's threshold, DARE's ratio ...) by reading the
accuracy off the GLUE validation sets they are reported on: tuning on the test set, an *oracle*.
``mergelit sweep --sweep.select_on dev|agreement`` scores every grid point on a criterion that
does not read the validation labels, picks the point with the highest value (ties: the first in
grid order), and reports that point's validation accuracy (**selected**) beside the best one of
the grid (**oracle**).

- ``dev``: accuracy (unweighted mean over tasks, each task under its own head) on the labeled
  **dev split**, ``data.dev_size`` rows per task carved from ``train`` with ``data.dev_seed``
  (``GLUEDataModule.dev_indices``). Reads the dev labels, never the validation split.
- ``agreement``: label-free. On the dev rows' *texts*, the fraction of rows where the merged
  model's prediction (task t's head) equals expert t's (fine-tuned body t under head t, i.e.
  ``Individual(pool, task=t)``), averaged over tasks. No label of any split is read.

Both run over the dev rows only, in a plain loop under ``torch.inference_mode`` (no second
``trainer.test``: loggers and report callbacks see only the validation run), and on every
process the same rows (the dev split is small): each rank computes the same value.

The dev rows are disjoint from the rows Fisher/RegMean draw their statistics from: a sweep with
selection runs every point with ``data.hold_out_dev: true`` (the statistics draw skips the dev
rows), so a point's report equals ``mergelit test ... --data.hold_out_dev true``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelit.glue import GLUEDataModule
from mergelit.methods.base import MergeMethod
from mergelit.methods.individual import Individual
from mergelit.pool import ModelPool

CRITERIA = ("dev", "agreement")
"""The values of ``sweep.select_on`` that select (``none`` does not)."""

TITLES = {"dev": "dev accuracy", "agreement": "agreement"}
"""The criterion's column header in sweep tables."""

LABELS_USED = {"dev": "dev labels (train rows)", "agreement": "none"}
"""What labels each criterion reads (recorded in sweep.json and the selected report)."""


def dev_record(datamodule: GLUEDataModule, tasks: Sequence[str]) -> dict[str, Any]:
    """The dev split, as recorded in ``sweep.json``: size, seed, rows per task, indices and their hash."""
    indices = {task: datamodule.dev_indices(task) for task in tasks}
    return {
        "split": "train",
        "size": datamodule.dev_size,
        "seed": datamodule.dev_seed,
        "rows": {task: len(rows) for task, rows in indices.items()},
        "sha256": hashlib.sha256(json.dumps(indices, sort_keys=True).encode()).hexdigest()[:16],
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


def select(names: Sequence[str], values: dict[str, float]) -> str:
    """The name with the highest criterion value; ties go to the first in ``names`` (grid order)."""
    best = names[0]
    for name in names[1:]:
        if values[name] > values[best]:
            best = name
    return best
