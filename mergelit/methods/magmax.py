"""MagMax: per entry, the task vector of largest magnitude.

Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024,
https://arxiv.org/abs/2407.06322 (here the case of independent fine-tunes of one θ0).

With τi = θi − θ0, on every body tensor (wte, wpe, LN, biases, Conv1D), elementwise and in task order:

    τmax ← τ1;  for i = 2..n:  τmax ← where(|τi| ≥ |τmax|, τi, τmax)
    θ* = θ0 + λ τmax

A tie goes to the **later** task (``>=``), as FusionBench's ``_magmax_select`` and the official
``merge_max_abs`` do. Entries no task changed (unseen-token rows of wte) stay at θ0. Elementwise, so
GPT-2's Conv1D [in, out] layout does not matter. The same float32 operations as FusionBench 0.2.33
(``method/magmax/magmax.py``: one subtraction, one comparison, λ·τmax, one addition), so the merge
equals FusionBench's bit for bit. Default λ = 0.5 (FusionBench and the official code).
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


def magmax_merge(pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.5) -> dict[str, Tensor]:
    """θ* = θ0 + λ τmax over whole state dicts (the reference the per-key merge is tested against).

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts (in task order).
        scaling_factor: λ.
    """
    scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
    check_finetuned(pretrained, finetuned)
    return {
        key: theta0 + scaling_factor * max_magnitude_tensor(theta0, [body[key] for body in finetuned.values()])
        for key, theta0 in pretrained.items()
    }


class MagMax(MergeMethod):
    """MagMax: θ* = θ0 + λ τmax, τmax taking each entry from the task vector of largest magnitude.

    Args:
        scaling_factor: λ, multiplies τmax (FusionBench's and the official default 0.5; the official
            grid is 20 values in (0, 1]).
    """

    display_name = "MagMax"
    symbols = {"scaling_factor": "λ"}
    recommended = {"scaling_factor": 0.5}
    search = {"scaling_factor": LAMBDAS}
    data = "none"

    def __init__(self, pool: ModelPool, scaling_factor: float = 0.5):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> str:
        # τmax depends on nothing but the pool: a λ sweep selects it once.
        return "max_magnitude_task_vector"

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        selected = self.reused(key, lambda: max_magnitude_tensor(theta0, thetas))
        return theta0 + self.scaling_factor * selected
