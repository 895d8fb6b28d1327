"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708.

With τi = θi − θ0, each flattened over the whole body (keys sorted by name) into one vector:

1. Trim: per task, keep the entries with |τi| ≥ the k-th smallest |τi|, k = d − int(d · threshold/100)
   (the top ``threshold`` % by magnitude over the whole body; ties at the cut are kept); zero the rest.
2. Elect: s = sign(Σ trimmed τi); entries where that is 0 take sign(Σ s), the majority sign.
3. Disjoint merge: keep the trimmed entries whose sign equals s and aggregate them: ``sum``
   (FusionBench's default and the reproduction setting), ``mean`` (divide by the number of kept
   entries, at least 1: the paper's choice) or ``max`` (largest magnitude, with sign s).

θ* = θ0 + λ τm. Default λ = 0.3; the best published GPT-2/GLUE λ is 0.6.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, flatten, unflatten

MERGE_FUNCS = ("sum", "mean", "max")


def _check_arguments(scaling_factor: float, threshold: float, merge_func: str) -> None:
    if not math.isfinite(scaling_factor):
        raise ValueError(f"scaling_factor (λ) must be a finite number, got {scaling_factor}.")
    if not 0 < threshold <= 100:
        raise ValueError(
            f"threshold is the percentage of each task vector's entries to keep and must be in (0, 100], "
            f"got {threshold}. (FusionBench read values <= 1 as fractions: its 0.2 is 20 here.)"
        )
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}; got {merge_func!r}.")


def _trim(tau: Tensor, threshold: float) -> Tensor:
    """Zero, in place, all but the top ``threshold`` % entries of ``tau`` by magnitude (ties at the cut kept)."""
    d = tau.numel()
    # k exactly as FusionBench computes it: int(d * K) with K = threshold / 100. Threshold 100
    # gives k = 0, which means keep everything; kthvalue counts from 1, and its 1st is the minimum.
    k = max(d - int(d * (threshold / 100)), 1)
    magnitude = tau.abs()
    kth_smallest = magnitude.kthvalue(k).values
    return tau.masked_fill_(magnitude < kth_smallest, 0)


def _elect_sign(trimmed: list[Tensor]) -> Tensor:
    """s = sign(Σ trimmed τi); its zeros take sign(Σ s)."""
    summed = torch.zeros_like(trimmed[0])
    for tau in trimmed:  # in task order, as FusionBench's sum over the stacked vectors
        summed += tau
    sign = summed.sign_()
    # Zeros: entries trimmed away in every task, or exact cancellations.
    return sign.masked_fill_(sign == 0, torch.sign(sign.sum()))


def _disjoint_merge(trimmed: list[Tensor], sign: Tensor, merge_func: str) -> Tensor:
    """Aggregate the entries of the trimmed τi whose sign equals ``sign``: sum, mean or max."""
    magnitude = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if merge_func == "mean" else None
    for tau in trimmed:
        # |τi| where sign(τi) == s, else 0. Trimmed-away entries are 0 and so never count.
        agreeing = (tau * sign).clamp_(min=0)
        if merge_func == "max":
            torch.maximum(magnitude, agreeing, out=magnitude)
        else:
            magnitude += agreeing
            if count is not None:
                count += agreeing > 0
    if count is not None:
        magnitude /= count.clamp_(min=1)
    # Every kept entry has sign s, so their sum (mean, max) is s times the sum (mean, max) of magnitudes.
    return magnitude.mul_(sign)


def ties_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 0.3,
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """θ* = θ0 + λ τm, τm the TIES merge of the task vectors τi = θi − θ0.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        scaling_factor: λ.
        threshold: percentage of each task vector's entries kept by the trim (by magnitude, whole body).
        merge_func: how the disjoint merge aggregates agreeing entries: ``sum``, ``mean`` or ``max``.
    """
    _check_arguments(scaling_factor, threshold, merge_func)
    merged_tau = ties_task_vector(pretrained, finetuned, threshold, merge_func)
    return {key: pretrained[key] + scaling_factor * tau for key, tau in merged_tau.items()}


def ties_task_vector(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm, the trimmed, sign-elected, disjoint merge of the task vectors: the part of the merge
    that does not depend on λ (a state dict of views into one flat tensor)."""
    _check_arguments(0.0, threshold, merge_func)
    check_finetuned(pretrained, finetuned)
    theta0 = flatten(pretrained)
    # Trim: one task vector at a time, so only the trimmed vectors stay in memory (float32, n × d).
    trimmed = [_trim(flatten(body).sub_(theta0), threshold) for body in finetuned.values()]
    del theta0
    # Elect sign.
    sign = _elect_sign(trimmed)
    # Disjoint merge.
    merged_tau = _disjoint_merge(trimmed, sign, merge_func)
    del trimmed, sign
    return unflatten(merged_tau, pretrained)


class TiesMerging(MergeMethod):
    """TIES-Merging: θ* = θ0 + λ τm, τm the trimmed, sign-elected, disjoint merge of the task vectors.

    Each task vector keeps only its largest entries (trim), every entry gets the sign of the
    summed trimmed vectors (elect), and only entries agreeing with it are aggregated (disjoint merge).

    Args:
        scaling_factor: λ, multiplies the merged task vector τm. The best published GPT-2/GLUE value is 0.6.
        threshold: percentage (0, 100] of each task vector's entries kept by the trim, chosen by
            magnitude over the whole body (the paper's k = 20 %).
        merge_func: aggregation of the agreeing entries: ``sum`` (FusionBench's default, reproduces
            the published numbers), ``mean`` (the paper's disjoint mean) or ``max`` (largest magnitude).
    """

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 0.3,
        threshold: float = 20,
        merge_func: Literal["sum", "mean", "max"] = "sum",
    ):
        super().__init__(pool)
        _check_arguments(scaling_factor, threshold, merge_func)
        self.scaling_factor = float(scaling_factor)
        self.threshold = threshold
        self.merge_func = merge_func
        self.save_hyperparameters(ignore=["pool"])

    def merge(self) -> dict[str, Tensor]:
        pretrained = self.pool.pretrained_body()
        # τm is computed once per pool and (threshold, merge_func): the points of a λ sweep only rescale it.
        merged_tau = self.pool.cached(
            ("ties_task_vector", float(self.threshold), self.merge_func),
            lambda: ties_task_vector(pretrained, self.pool.finetuned_bodies(), self.threshold, self.merge_func),
        )
        return {key: pretrained[key] + self.scaling_factor * tau for key, tau in merged_tau.items()}
