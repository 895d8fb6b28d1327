"""Individual: no merge. One task's fine-tuned body under every task's own head: run once per task
it fills one row of the 7x7 cross-task table; on its own task it is that model's accuracy (the ceiling)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.errors import KeyMissing
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool


class Individual(MergeMethod):
    """Individual: θ* = θ_task, one fine-tuned body, scored under every task's own head.

    Args:
        task: whose fine-tuned body to use (a task of the pool, e.g. ``cola``).
    """

    display_name = "Individual"
    symbols = {"task": "Model"}
    comparison = False  # one row per task: the 7x7 sweep (configs/sweeps/individual_7x7.yaml)

    def __init__(self, pool: ModelPool, task: str):
        super().__init__(pool)
        if task not in pool.tasks:
            raise KeyMissing(f"Individual: task {task!r} is not in the pool; choose one of {', '.join(pool.tasks)}.")
        self.task = task
        self.save_hyperparameters(ignore=["pool"])

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return self.pool.finetuned_tensor(self.task, key)
