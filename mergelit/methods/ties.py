"""TIES-Merging: trim, elect sign, disjoint merge (the steps live in ``mergelit.state_dict``).

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708. Each τi = θi − θ0 keeps its top ``threshold`` share by magnitude over
the whole body; s = sign(Σ trimmed τi); the entries agreeing with s are aggregated (``merge_func``) into
τm; θ* = θ0 + λ τm. Details: docs/methods.md.
"""

from __future__ import annotations

from typing import Literal, Sequence

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import check_choice, check_number
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import (
    MERGE_FUNCS, TiesElection, check_finetuned, disjoint_merge, elect_sign, flatten, pool_task_vectors, ties_election,
    trim, unflatten,
)


def check_threshold(threshold: float) -> float:
    """TIES's ``threshold``: in (0, 100], a value <= 1 read as a fraction (as FusionBench)."""
    name = "threshold (the share of each task vector TIES keeps: 20 = 20 %, or a fraction <= 1)"
    return check_number(threshold, name, 0, 100, low_open=True)


def ties_task_vector(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm over whole bodies, the λ-free part of the merge: trim, elect, disjoint merge of the flat τi."""
    check_finetuned(pretrained, finetuned)
    theta0 = flatten(pretrained)
    trimmed = [trim(flatten(body).sub_(theta0), threshold) for body in finetuned.values()]
    del theta0
    return unflatten(disjoint_merge(trimmed, elect_sign(trimmed), merge_func), pretrained)


def ties_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.3,
    threshold: float = 20, merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """θ* = θ0 + λ τm over whole bodies (the arguments as ``TiesMerging``'s)."""
    check_number(scaling_factor, "scaling_factor (λ)")
    merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
    merged = ties_task_vector(pretrained, finetuned, check_threshold(threshold), merge_func)
    return {key: theta0 + scaling_factor * merged[key] for key, theta0 in pretrained.items()}


class TiesMerging(MergeMethod):
    """TIES-Merging: θ* = θ0 + λ τm, τm the trimmed, sign-elected, disjoint merge of the task vectors.

    Args:
        scaling_factor: λ, multiplies τm (the best published GPT-2/GLUE value is 0.6).
        threshold: the share of each task vector the trim keeps (20 = 20 %; ≤ 1 a fraction, as FusionBench).
        merge_func: ``sum`` (FusionBench's, reproduces the published numbers), ``mean`` (the paper's) or ``max``.
    """

    display_name = "TIES-Merging"
    symbols = {"scaling_factor": "λ", "threshold": "k"}
    recommended = {"scaling_factor": 0.6}  # the best published GPT-2/GLUE λ
    search = {"scaling_factor": LAMBDAS}

    def __init__(
        self, pool: ModelPool, scaling_factor: float = 0.3, threshold: float = 20,
        merge_func: Literal["sum", "mean", "max"] = "sum",
    ):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
        self.threshold = check_threshold(threshold)
        self.merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
        if threshold <= 1:
            rank_zero_info(
                f"TIES-Merging: threshold {threshold} <= 1 is read as a fraction: the trim keeps {100 * threshold:g} %."
            )
        self._election: TiesElection | None = None
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the pool, the threshold and merge_func, not on λ: a λ sweep computes it once.
        return ("ties_task_vector", float(self.threshold), self.merge_func)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        merged = self.reused(key, lambda: self._merged_task_vector(key, theta0, thetas))
        return theta0 + self.scaling_factor * merged

    def _merged_task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if self._election is None:  # only when some key is not reused from an earlier sweep point
            self._election = ties_election(*pool_task_vectors(self.pool), self.threshold)
        merged = self._election.merged(key, theta0, thetas, self.merge_func)
        if not self._election.signs:
            self._election = None  # every key merged: the signs are gone, a new merge elects again
        return merged
