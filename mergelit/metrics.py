"""The extra metrics papers report beside accuracy, computed exactly from confusion counts.

CoLA: Matthews correlation; MRPC, QQP: F1 of class 1. Both come from the four counts of a binary
confusion matrix, summed across processes (so DDP gives the one-process value), and follow
GLUE's scorer (scikit-learn): **0 where the denominator is 0** (predictions or labels all of one
class), never an epsilon-smoothed value.
"""

from __future__ import annotations

import math

import torch
import torchmetrics
from torch import Tensor

EXTRA_METRICS: dict[str, str] = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}
"""Task -> the metric papers also report beside accuracy: CoLA Matthews correlation, MRPC/QQP F1 of class 1."""


def matthews_corrcoef(tp: int, fp: int, fn: int, tn: int) -> float:
    """(tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when any factor is 0 (scikit-learn's rule)."""
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denominator == 0:
        return 0.0
    return (tp * tn - fp * fn) / math.sqrt(denominator)


def f1_score(tp: int, fp: int, fn: int, tn: int = 0) -> float:
    """2·tp / (2·tp + fp + fn) for class 1; 0 when there is no positive label or prediction."""
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2 * tp / denominator


METRIC_FUNCTIONS = {"mcc": matthews_corrcoef, "f1": f1_score}


def confusion_counts(predicted, labels) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of binary predictions against labels (class 1 positive)."""
    predicted = torch.as_tensor(predicted).reshape(-1).bool()
    labels = torch.as_tensor(labels).reshape(-1).bool()
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    return tp, fp, fn, tn


def binary_metric(name: str, predicted, labels) -> float:
    """``mcc`` or ``f1`` of binary predictions against labels (class 1 positive)."""
    return METRIC_FUNCTIONS[name](*confusion_counts(predicted, labels))


class BinaryCounts(torchmetrics.Metric):
    """The confusion counts of a binary task (class 1 positive), summed across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, labels: Tensor) -> None:
        predicted, labels = predicted.reshape(-1).bool(), labels.reshape(-1).bool()
        self.tp += (predicted & labels).sum()
        self.fp += (predicted & ~labels).sum()
        self.fn += (~predicted & labels).sum()
        self.tn += (~predicted & ~labels).sum()

    def compute(self) -> tuple[int, int, int, int]:
        return int(self.tp), int(self.fp), int(self.fn), int(self.tn)

    def compute_metric(self, name: str) -> float:
        """``mcc`` or ``f1`` from the (synced) counts."""
        return METRIC_FUNCTIONS[name](*self.compute())
