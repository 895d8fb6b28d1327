"""Task Arithmetic: add the scaled sum of task vectors to the pretrained body.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089.

With τi = θi − θ0:  θ* = θ0 + λ Σ τi  (a sum, not a mean), on every body tensor,
embeddings included. Default λ = 0.3; the best published GPT-2/GLUE λ is 0.5.
"""

from __future__ import annotations

import math

from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, task_vector


def _check_scaling_factor(scaling_factor: float) -> float:
    if not math.isfinite(scaling_factor):
        raise ValueError(f"scaling_factor (λ) must be a finite number, got {scaling_factor}.")
    return float(scaling_factor)


def task_arithmetic_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float
) -> dict[str, Tensor]:
    """θ* = θ0 + λ Σ τi with τi = θi − θ0.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        scaling_factor: λ.
    """
    scaling_factor = _check_scaling_factor(scaling_factor)
    summed = task_vector_sum(pretrained, finetuned)
    return {key: pretrained[key] + scaling_factor * summed[key] for key in pretrained}


def task_vector_sum(pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Σ τi, τi = θi − θ0: the part of the merge that does not depend on λ."""
    check_finetuned(pretrained, finetuned)
    # Σ τi accumulated in task order, then scaled once, as FusionBench does (same float32 rounding).
    bodies = iter(finetuned.values())
    summed = task_vector(next(bodies), pretrained)
    for body in bodies:
        for key, tau in summed.items():
            tau += body[key] - pretrained[key]
    return summed


class TaskArithmetic(MergeMethod):
    """Task Arithmetic: θ* = θ0 + λ Σ τi, with task vectors τi = θi − θ0.

    Args:
        scaling_factor: λ, multiplies the sum (not the mean) of the task vectors. 0 gives the
            pretrained body; the best published GPT-2/GLUE value is 0.5.
    """

    def __init__(self, pool: ModelPool, scaling_factor: float = 0.3):
        super().__init__(pool)
        self.scaling_factor = _check_scaling_factor(scaling_factor)
        self.save_hyperparameters(ignore=["pool"])

    def merge(self) -> dict[str, Tensor]:
        pretrained = self.pool.pretrained_body()
        # Σ τi is computed once per pool: the points of a λ sweep only rescale it.
        summed = self.pool.cached(
            "task_vector_sum", lambda: task_vector_sum(pretrained, self.pool.finetuned_bodies())
        )
        return {key: pretrained[key] + self.scaling_factor * summed[key] for key in pretrained}
