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
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mergelit.glue import GLUEDataModule, rows_hash
from mergelit.methods.base import MergeMethod
from mergelit.methods.individual import Individual
from mergelit.pool import ModelPool
from mergelit.tables import CRITERION_SUFFIX, SELECTION

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


def read_criterion(report_path: Path, select_on: str, dev: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The point's stored criterion, or None when missing or computed for another criterion or dev rows."""
    try:
        scored = json.loads(criterion_path(report_path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(scored, dict) or scored.get("select_on") != select_on or scored.get("dev_sha256") != dev["sha256"]:
        return None
    return scored


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
                raise ValueError(f"Sweep folder {folder}: point {name!r} has no {select_on} criterion for these dev rows.")
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
