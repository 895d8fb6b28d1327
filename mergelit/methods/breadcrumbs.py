"""Model Breadcrumbs: drop the smallest and the largest |τ| of each task vector, then Task Arithmetic.

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, https://arxiv.org/abs/2312.06795.

With τi = θi − θ0, per tensor and per task (N = numel, k = ``keep_fraction``, γ = ``outlier_fraction``):

1. Mask: sort |τi| ascending; zero the int(γ·N) largest (outliers) and the N − int(k·N) − int(γ·N)
   smallest (noise); int(k·N) entries survive, the ones just below the outliers.
2. Merge: θ* = θ0 + λ Σi τ̃i (a sum, as Task Arithmetic).

Not in FusionBench. The per-tensor rule is mergekit's ``breadcrumbs`` (``magnitude_outliers``
sparsification, no sign consensus), with one fix: mergekit keeps the slice ``idx[n_bot:-n_top]``,
which is empty when n_top = int(γ·N) = 0 (γ·N < 1: γ = 0, or a small γ on a 768-entry LayerNorm
or bias), so it zeroes that whole tensor's τ; here the slice is ``idx[n_bot : N - n_top]``. As in
mergekit, ``keep_fraction = 1`` leaves τ untouched whatever ``outlier_fraction`` is. Ties in |τ|
are broken by position (a stable sort): the lower index counts as smaller. Exact zeros (the τ of
``wte`` rows for tokens never seen in fine-tuning) tie massively, count in N and go first, so on
``wte`` "keep 15 %" keeps a larger share of the non-zero entries than it says.

``per_row=True`` is the original code's rule (rezazzr/breadcrumbs ``TaskVectorMiddleKeep``):
per row along the last dimension (1-D tensors are one row), zero the top int(d·γ) |τ| of each
row of width d, then keep the top int(d·k) of what is left. That is layout-sensitive: a row of an
``nn.Linear`` weight [out, in] is one output neuron's incoming weights, while GPT-2's Conv1D
stores [in, out]. To be paper-faithful the 48 Conv1D weights are transposed to [out, in], masked
by row and transposed back; ``wte``/``wpe`` are masked as stored (a row per token / position).

No randomness. Cost: one selection per tensor per task. A stable sort of ``wte``'s τ (38.6 M
entries) takes ≈6 s on this CPU, so the two cut-off magnitudes are found with ``numpy.partition``
and only entries tied with a cut-off are ordered by position: the same mask as the sort, ≈1 s
per ``wte``. At GPT-2 small with 7 tasks the merge took ≈80 s (2 threads, shared host;
``benchmarks/method_cost.py``). It streams key by key (``merge_tensor``), one θi at a time, so
beside the merged body it holds a few copies of one tensor (``wte``'s, the largest) whatever the
number of models: on a 2-layer, 256-wide pool (56 MB a body, ``wte`` 88 % of it) the peak RSS
above the merge's start was 308 MB at N = 2 and 318 MB at N = 7 (the whole-body function: 432
and 733 MB; glibc's mmap threshold fixed at 64 KiB). The 10 MB are not N's: two of the seven
tasks have |τ| ties at ``wte``'s cut-offs, whose ordering takes one more ``wte``-sized mask.
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


def _check_arguments(scaling_factor: float, keep_fraction: float, outlier_fraction: float) -> tuple[float, float, float]:
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
    """τ̃: τ with all but the int(k·N) entries just below the int(γ·N) largest |τ| set to 0 (new tensor).

    Per tensor (mergekit's ``magnitude_outliers`` with the n_top = 0 fix): in the stable ascending
    order of |τ|, the entries at ranks [n_bot, N − n_top) are kept, n_top = int(γ·N),
    n_bot = N − int(k·N) − n_top. ``keep_fraction >= 1`` returns τ unchanged (a copy).
    """
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
    # The magnitudes at those two ranks (order statistics without a full sort): partition at
    # `first`, then the part above it (the ranks >= first, 15 % of wte by default) at `last`.
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
    """τ̃ by the original code's rule: per row of the last dimension (width d), zero the top
    int(d·γ) |τ|, then keep the top int(d·k) |·| of the rest (new tensor). 0-D: unchanged."""
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
    key: str,
    pretrained: Tensor,
    finetuned: Sequence[Tensor],
    keep_fraction: float = 0.15,
    outlier_fraction: float = 0.006,
    per_row: bool = False,
) -> Tensor:
    """Σi τ̃i for one tensor ``key``: each τi = θi − θ0 masked, then summed in task order.

    Per key, so a merge streams tensor by tensor, one θi at a time. ``key`` matters only with
    ``per_row`` (Conv1D weights are masked as [out, in]).
    """
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


def breadcrumbs_task_vector(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    keep_fraction: float = 0.15,
    outlier_fraction: float = 0.006,
    per_row: bool = False,
) -> dict[str, Tensor]:
    """Σi τ̃i over the body, key by key (``breadcrumbs_tensor``): the part of the merge that does not
    depend on λ."""
    _check_arguments(0.0, keep_fraction, outlier_fraction)
    check_finetuned(pretrained, finetuned)
    bodies = list(finetuned.values())
    return {
        key: breadcrumbs_tensor(key, theta0, [body[key] for body in bodies], keep_fraction, outlier_fraction, per_row)
        for key, theta0 in pretrained.items()
    }


def breadcrumbs_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 0.3,
    keep_fraction: float = 0.15,
    outlier_fraction: float = 0.006,
    per_row: bool = False,
) -> dict[str, Tensor]:
    """θ* = θ0 + λ Σi τ̃i, τ̃i the task vectors with their smallest and largest |τ| masked.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        scaling_factor: λ.
        keep_fraction: k, the fraction of each tensor's (or row's) entries kept.
        outlier_fraction: γ, the fraction of largest |τ| removed.
        per_row: the original code's per-row rule (Conv1D weights as [out, in]) instead of per tensor.
    """
    _check_arguments(scaling_factor, keep_fraction, outlier_fraction)
    summed = breadcrumbs_task_vector(pretrained, finetuned, keep_fraction, outlier_fraction, per_row)
    return add_scaled(pretrained, summed, scaling_factor)


class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: θ* = θ0 + λ Σi τ̃i, each τi without its smallest and its largest |τ|, per tensor.

    Args:
        scaling_factor: λ, multiplies the sum of the masked task vectors. Default 0.3, mergelit's Task
            Arithmetic and TIES default, so the three compare at one λ; it lies in the original code's
            search range α ~ U(0.01, 1) (whose first point, 0.2, is where a random search starts, not a
            recommendation). mergekit's λ = 1 assumes per-model weights that already scale each τ.
        keep_fraction: fraction of each tensor's entries kept (mergekit ``density``; the original code's
            ``beta``). Default 0.15, the original code's first search point (range 0.05–0.20); mergekit's
            default 1.0 masks nothing, i.e. plain Task Arithmetic. 1 leaves τ untouched (per tensor).
        outlier_fraction: fraction of each tensor's largest |τ| removed (mergekit ``gamma``; the
            original code's ``gamma``). Default 0.006, the original code's first search point (range
            0.001–0.01); mergekit's default is 0.01. keep_fraction + outlier_fraction must be ≤ 1.
        per_row: False (default): per tensor, mergekit's rule. True: the original code's rule, per row
            of the last dimension with GPT-2's Conv1D weights transposed to [out, in] first, so a row is
            one output neuron's incoming weights as in the paper's nn.Linear models.
    """

    display_name = "Model Breadcrumbs"
    symbols = {"scaling_factor": "λ", "keep_fraction": "k", "outlier_fraction": "γ"}
    recommended = {"scaling_factor": 0.3, "keep_fraction": 0.15, "outlier_fraction": 0.006}
    search = {"scaling_factor": LAMBDAS}
    kind = "merged"
    data = "none"

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 0.3,
        keep_fraction: float = 0.15,
        outlier_fraction: float = 0.006,
        per_row: bool = False,
    ):
        super().__init__(pool)
        self.scaling_factor, self.keep_fraction, self.outlier_fraction = _check_arguments(scaling_factor, keep_fraction, outlier_fraction)
        self.per_row = bool(per_row)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # Σ τ̃i depends on the masks' arguments, not on λ: a λ sweep masks once.
        return ("breadcrumbs_task_vector", self.keep_fraction, self.outlier_fraction, self.per_row)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        summed = self.reused(
            key, lambda: breadcrumbs_tensor(key, theta0, thetas, self.keep_fraction, self.outlier_fraction, self.per_row)
        )
        return theta0 + self.scaling_factor * summed
