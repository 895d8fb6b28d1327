"""MagMax: per entry, the task vector of largest magnitude (ties: the later task); θ* = θ0 + λ τmax.

Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024,
https://arxiv.org/abs/2407.06322 (here independent fine-tunes of one θ0). FusionBench 0.2.33's
float32 operations, so the merge equals its bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from mergelit.errors import check_number
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned


def max_magnitude_tensor(theta0: Tensor, thetas: Iterable[Tensor]) -> Tensor:
    """τmax of one tensor: in task order, τi replaces the running selection where |τi| ≥ |τmax|."""
    selected = None
    for theta in thetas:  # one θi at a time
        tau = theta - theta0
        selected = tau if selected is None else torch.where(tau.abs() >= selected.abs(), tau, selected)
    return selected


def magmax_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.5
) -> dict[str, Tensor]:
    """θ* = θ0 + λ τmax over whole state dicts: θ0 (``pretrained``), task -> θi (``finetuned``), λ."""
    scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
    check_finetuned(pretrained, finetuned)
    return {
        key: theta0 + scaling_factor * max_magnitude_tensor(theta0, [body[key] for body in finetuned.values()])
        for key, theta0 in pretrained.items()
    }


class MagMax(MergeMethod):
    """MagMax: θ* = θ0 + λ τmax, τmax taking each entry from the task vector of largest magnitude.

    Args:
        scaling_factor: λ, multiplies τmax (FusionBench's and the official default 0.5).
    """

    display_name = "MagMax"
    symbols = {"scaling_factor": "λ"}
    recommended = {"scaling_factor": 0.5}
    search = {"scaling_factor": LAMBDAS}

    def __init__(self, pool: ModelPool, scaling_factor: float = 0.5):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> str:
        return "max_magnitude_task_vector"  # τmax depends on the pool alone: a λ sweep selects once

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0 + self.scaling_factor * self.reused(key, lambda: max_magnitude_tensor(theta0, thetas))
