"""Task Arithmetic: add the scaled sum of task vectors to the pretrained body.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089.

With τi = θi − θ0:  θ* = θ0 + λ Σ τi  (a sum, not a mean), on every body tensor,
embeddings included. Default λ = 0.3; the best published GPT-2/GLUE λ is 0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool, can_stream, row_chunks
from mergelit.state_dict import add_scaled, check_finetuned, task_vector


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
    return add_scaled(pretrained, task_vector_sum(pretrained, finetuned), scaling_factor)


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


def task_vector_sum_streamed(pool: ModelPool) -> dict[str, Tensor]:
    """``task_vector_sum(pool.pretrained_body(), pool.finetuned_bodies())`` read tensor by tensor
    (piece by piece) from the pool's memory-mapped checkpoints: it holds Σ τi and a few pieces,
    whatever n. Same operations in the same order, so the result is bit-identical."""
    if not pool.tasks:
        raise ValueError("No fine-tuned bodies to merge: give at least one task.")
    pool.check()  # keys and shapes of every body, from the checkpoint headers
    first, *rest = pool.tasks
    summed = {}
    for key, shape in pool.body_shapes().items():
        tensor = torch.empty(shape)
        for rows in row_chunks(shape):
            theta0 = pool.pretrained_tensor(key, rows)
            piece = tensor if rows is None else tensor[rows]
            torch.sub(pool.finetuned_tensor(first, key, rows), theta0, out=piece)
            for task in rest:
                piece += pool.finetuned_tensor(task, key, rows) - theta0
        summed[key] = tensor
    return summed


def add_scaled_streamed(pool: ModelPool, task_vector: dict[str, Tensor], scaling_factor: float) -> dict[str, Tensor]:
    """``add_scaled(pool.pretrained_body(), task_vector, λ)`` with θ0 read tensor by tensor (bit-identical)."""
    return {key: pool.pretrained_tensor(key) + scaling_factor * task_vector[key] for key in pool.keys()}


class TaskArithmetic(MergeMethod):
    """Task Arithmetic: θ* = θ0 + λ Σ τi, with task vectors τi = θi − θ0.

    Args:
        scaling_factor: λ, multiplies the sum (not the mean) of the task vectors. 0 gives the
            pretrained body; the best published GPT-2/GLUE value is 0.5.
    """

    display_name = "Task Arithmetic"
    symbols = {"scaling_factor": "λ"}
    recommended = {"scaling_factor": 0.5}  # the best published GPT-2/GLUE λ

    def __init__(self, pool: ModelPool, scaling_factor: float = 0.3):
        super().__init__(pool)
        self.scaling_factor = _check_scaling_factor(scaling_factor)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> str:
        # Σ τi depends on nothing but the pool: a λ sweep computes it once and only rescales it.
        return "task_vector_sum"

    def merge(self) -> dict[str, Tensor]:
        # Streamed from the checkpoints: bit-identical to task_arithmetic_merge of the whole bodies.
        if not can_stream(self.pool):
            pretrained = self.pool.pretrained_body()
            if self.reusable is None:
                self.reusable = task_vector_sum(pretrained, self.pool.finetuned_bodies())
            return add_scaled(pretrained, self.reusable, self.scaling_factor)
        if self.reusable is None:
            self.reusable = task_vector_sum_streamed(self.pool)
        return add_scaled_streamed(self.pool, self.reusable, self.scaling_factor)
