"""Model Breadcrumbs: drop the smallest and the largest |τ| of each task vector, then Task Arithmetic.

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, https://arxiv.org/abs/2312.06795; mergekit's per-tensor rule with its empty-slice bug fixed
(or, ``per_row``, the original code's). θ* = θ0 + λ Σi τ̃i. Details: docs/methods.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mergelit.errors import MergelitError, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import add_scaled, check_finetuned


def _check_arguments(scaling_factor: float, keep_fraction: float, outlier_fraction: float) -> tuple:
    """``(λ, k, γ)`` checked: k in (0, 1], γ in [0, 1), k + γ <= 1 unless k = 1."""
    scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
    keep_fraction = check_number(keep_fraction, "keep_fraction (mergekit's density)", 0, 1, low_open=True)
    outlier_fraction = check_number(outlier_fraction, "outlier_fraction (mergekit's gamma)", 0, 1, high_open=True)
    if keep_fraction < 1 and keep_fraction + outlier_fraction > 1:
        raise MergelitError(
            f"keep_fraction + outlier_fraction must be at most 1 (the kept entries lie below the outliers), "
            f"got {keep_fraction} + {outlier_fraction}."
        )
    return scaling_factor, keep_fraction, outlier_fraction


def mask_magnitude_outliers(tau: Tensor, keep_fraction: float, outlier_fraction: float) -> Tensor:
    """τ̃ (new): only τ's ranks [N − int(kN) − int(γN), N − int(γN)) of the stable ascending |τ| kept (k ≥ 1: all)."""
    if keep_fraction >= 1:
        return tau.clone()
    n = tau.numel()
    n_top = int(outlier_fraction * n)
    n_bot = n - int(keep_fraction * n) - n_top
    if n_bot < 0:  # only if k + γ > 1, which the method refuses; mergekit shrinks the outliers
        n_top, n_bot = n_top + n_bot, 0
    if n - n_top <= n_bot:  # nothing kept
        return torch.zeros_like(tau)
    magnitude = tau.detach().abs().reshape(-1).float()
    first, last = n_bot, n - n_top - 1  # ranks of the smallest and the largest kept |τ|
    # The magnitudes at those two ranks without a full sort (6 s on wte's τ; this takes 1 s): partition
    # at `first`, then the part above it (15 % of wte by default) at `last`.
    partitioned = np.partition(magnitude.numpy(), first)
    low = float(partitioned[first])
    high = float(np.partition(partitioned[first:], last - first)[last - first])
    del partitioned
    keep = (magnitude >= low) & (magnitude <= high)
    if int(keep.sum()) > last - first + 1:
        # Entries tied with a cut-off: a stable sort puts them in index order, at consecutive ranks
        # from (number of smaller entries); keep only those whose rank falls in [first, last].
        del keep
        keep = (magnitude > low) & (magnitude < high)
        for cutoff in {low, high}:
            if cutoff == 0:  # zeros are 0 whether kept or not: skip ordering a huge tie
                continue
            tied = (magnitude == cutoff).nonzero().squeeze(1)
            rank0 = int((magnitude < cutoff).sum())
            keep[tied[max(first - rank0, 0) : last - rank0 + 1]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros((), dtype=tau.dtype))


def mask_magnitude_outliers_per_row(tau: Tensor, keep_fraction: float, outlier_fraction: float) -> Tensor:
    """τ̃ (new), the original rule: per row of width d, zero the top int(dγ) |τ|, keep the top int(dk) of the rest."""
    if tau.dim() == 0:
        return tau.clone()
    rows = tau.reshape(-1, tau.shape[-1])
    d = rows.shape[-1]
    n_top, n_keep = int(d * outlier_fraction), int(d * keep_fraction)
    if n_top > 0:  # remove each row's outliers
        rows = rows.scatter(-1, rows.abs().topk(n_top, dim=-1).indices, 0.0)
    kept = rows.abs().topk(n_keep, dim=-1).indices
    return torch.zeros_like(rows).scatter(-1, kept, rows.gather(-1, kept)).view(tau.shape)


def breadcrumbs_tensor(
    key: str, pretrained: Tensor, finetuned: Sequence[Tensor], keep_fraction: float = 0.15,
    outlier_fraction: float = 0.006, per_row: bool = False,
) -> Tensor:
    """Σi τ̃i of one tensor ``key`` (which matters only ``per_row``), one θi at a time, summed in task order."""
    summed = torch.zeros_like(pretrained)
    for index in range(len(finetuned)):  # by index: neither θi nor τi is held while the next is read
        tau = finetuned[index] - pretrained
        if not per_row:
            summed += mask_magnitude_outliers(tau, keep_fraction, outlier_fraction)
        elif is_conv1d_weight(key):
            # GPT-2's Conv1D stores W as [in, out]: the paper's rows (one output neuron each) are its columns.
            summed += mask_magnitude_outliers_per_row(tau.T, keep_fraction, outlier_fraction).T
        else:
            summed += mask_magnitude_outliers_per_row(tau, keep_fraction, outlier_fraction)
        del tau
    return summed


def breadcrumbs_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.3,
    keep_fraction: float = 0.15, outlier_fraction: float = 0.006, per_row: bool = False,
) -> dict[str, Tensor]:
    """θ* = θ0 + λ Σi τ̃i over whole state dicts (the arguments as ``Breadcrumbs``'s)."""
    _check_arguments(scaling_factor, keep_fraction, outlier_fraction)
    check_finetuned(pretrained, finetuned)
    bodies = list(finetuned.values())
    summed = {
        key: breadcrumbs_tensor(key, theta0, [body[key] for body in bodies], keep_fraction, outlier_fraction, per_row)
        for key, theta0 in pretrained.items()
    }
    return add_scaled(pretrained, summed, scaling_factor)


class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: θ* = θ0 + λ Σi τ̃i, each τi without its smallest and its largest |τ|, per tensor.

    Args:
        scaling_factor: λ, multiplies the sum of the masked task vectors (Task Arithmetic's and TIES's 0.3).
        keep_fraction: k, the share of each tensor's entries kept (mergekit ``density``); 1 leaves τ untouched.
        outlier_fraction: γ, the share of each tensor's largest |τ| removed (mergekit ``gamma``); k + γ ≤ 1.
        per_row: the original code's rule, per row of the last dimension (Conv1D weights as [out, in]).
    """

    display_name = "Model Breadcrumbs"
    symbols = {"scaling_factor": "λ", "keep_fraction": "k", "outlier_fraction": "γ"}
    recommended = {"scaling_factor": 0.3, "keep_fraction": 0.15, "outlier_fraction": 0.006}
    search = {"scaling_factor": LAMBDAS}

    def __init__(
        self, pool: ModelPool, scaling_factor: float = 0.3, keep_fraction: float = 0.15,
        outlier_fraction: float = 0.006, per_row: bool = False,
    ):
        super().__init__(pool)
        checked = _check_arguments(scaling_factor, keep_fraction, outlier_fraction)
        self.scaling_factor, self.keep_fraction, self.outlier_fraction = checked
        self.per_row = bool(per_row)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # Σ τ̃i depends on the masks' arguments, not on λ: a λ sweep masks once.
        return ("breadcrumbs_task_vector", self.keep_fraction, self.outlier_fraction, self.per_row)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        def summed() -> Tensor:
            return breadcrumbs_tensor(key, theta0, thetas, self.keep_fraction, self.outlier_fraction, self.per_row)

        return theta0 + self.scaling_factor * self.reused(key, summed)
