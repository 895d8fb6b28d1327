"""Task Arithmetic: add the scaled sum of task vectors to the pretrained body.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089.

With τi = θi − θ0:  θ* = θ0 + λ Σ τi  (a sum, not a mean), on every body tensor, embeddings included.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.errors import check_number
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, task_vector_sum


def task_arithmetic_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float
) -> dict[str, Tensor]:
    """θ* = θ0 + λ Σ τi over whole state dicts: θ0 (``pretrained``), task -> θi (``finetuned``), λ."""
    scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
    check_finetuned(pretrained, finetuned)
    return {
        key: theta0 + scaling_factor * task_vector_sum(theta0, [body[key] for body in finetuned.values()])
        for key, theta0 in pretrained.items()
    }


class TaskArithmetic(MergeMethod):
    """Task Arithmetic: θ* = θ0 + λ Σ τi, with task vectors τi = θi − θ0.

    Args:
        scaling_factor: λ, multiplies the sum (not the mean) of the task vectors (best published GPT-2/GLUE: 0.5).
    """

    display_name = "Task Arithmetic"
    symbols = {"scaling_factor": "λ"}
    recommended = {"scaling_factor": 0.5}  # the best published GPT-2/GLUE λ
    search = {"scaling_factor": LAMBDAS}

    def __init__(self, pool: ModelPool, scaling_factor: float = 0.3):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> str:
        return "task_vector_sum"  # Σ τi depends on the pool alone: a λ sweep sums once and rescales

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0 + self.scaling_factor * self.reused(key, lambda: task_vector_sum(theta0, thetas))
