"""The extra metrics papers report beside accuracy (CoLA MCC, MRPC/QQP F1 of class 1), from confusion counts.

The counts are summed across processes (DDP gives the one-process value); as GLUE's scorer (scikit-learn), a
metric is 0 where its denominator is 0 (one-class predictions or labels), never an epsilon-smoothed value.
"""

from __future__ import annotations

import math

import torch
import torchmetrics
from torch import Tensor

EXTRA_METRICS: dict[str, str] = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}


def matthews_corrcoef(tp: int, fp: int, fn: int, tn: int) -> float:
    """(tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when any factor is 0 (scikit-learn's rule)."""
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / math.sqrt(denominator)


def f1_score(tp: int, fp: int, fn: int, tn: int = 0) -> float:
    """2·tp / (2·tp + fp + fn) for class 1; 0 when there is no positive label or prediction."""
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2 * tp / denominator


METRIC_FUNCTIONS = {"mcc": matthews_corrcoef, "f1": f1_score}
_COUNTS = ("tp", "fp", "fn", "tn")


def _counts(predicted, labels) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tp, fp, fn, tn)`` of binary predictions against labels (class 1 positive), as tensors."""
    predicted = torch.as_tensor(predicted).reshape(-1).bool()
    labels = torch.as_tensor(labels).reshape(-1).bool()
    tp, fp = (predicted & labels).sum(), (predicted & ~labels).sum()
    fn, tn = (~predicted & labels).sum(), (~predicted & ~labels).sum()
    return tp, fp, fn, tn


def binary_metric(name: str, predicted, labels) -> float:
    """``mcc`` or ``f1`` of binary predictions against labels (class 1 positive)."""
    return METRIC_FUNCTIONS[name](*(int(count) for count in _counts(predicted, labels)))


class BinaryCounts(torchmetrics.Metric):
    """The confusion counts of a binary task (class 1 positive), summed across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in _COUNTS:
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, labels: Tensor) -> None:
        for name, count in zip(_COUNTS, _counts(predicted, labels)):
            setattr(self, name, getattr(self, name) + count)

    def compute(self) -> tuple[int, int, int, int]:
        return int(self.tp), int(self.fp), int(self.fn), int(self.tn)

    def compute_metric(self, name: str) -> float:
        """``mcc`` or ``f1`` from the (synced) counts."""
        return METRIC_FUNCTIONS[name](*self.compute())
