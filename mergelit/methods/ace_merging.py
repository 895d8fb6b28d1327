"""ACE-Merging: a closed-form merge with covariances estimated from the task vectors themselves.

Xu et al. 2026, "ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation", CVPR 2026,
https://arxiv.org/abs/2603.02945; follows the official GPT-2/GLUE run (unravel-xu/ACE-Merging,
``MergeStrategy.ace_merging``), quirks included. Per 2-D tensor, W0 = B A⁻¹ from the task vectors'
ridge-regularised column covariances and a row prior, refined spectrally when the tasks' magnitudes are
heterogeneous (γ > threshold); other tensors take the mean τi. Steps and quirks: docs/methods.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import MergeFailed, check_choice, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.linalg import ordered_sum
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned

COVARIANCE_SIDES = ("stored", "input")


def _centred_covariance(tau: Tensor, flag: bool, eps: float) -> tuple[Tensor, Tensor, float]:
    """(W̃, C, εi) of one task: W̃ = τ minus its row mean, C = W̃ᵀW̃ (divided by its trace if flag)."""
    centred = tau - tau.mean(dim=0, keepdim=True)
    gram = centred.T @ centred
    trace = torch.trace(gram) + 1e-12
    if flag:
        return centred, gram / trace, eps / trace
    return centred, gram, eps


def ace_tensor(
    task_vector: Callable[[int], Tensor], n: int, eps: float = 0.01, k_frac: float = 0.3,
    heterogeneity_threshold: float = 0.3, name: str = "tensor", tasks: Sequence[str] | None = None,
) -> tuple[Tensor, float]:
    """(τm, γ) of one 2-D tensor from τi = ``task_vector(i)`` (float64, new at each of its 2-3 calls per task)."""
    traces = torch.tensor([float((tau * tau).sum()) for tau in map(task_vector, range(n))], dtype=torch.float64)
    # γ = var(ℓ) / (mean(ℓ)² + 1e-12), ℓ = log(tr + 1e-12); one task: NaN (as torch.var, without its warning).
    logs = torch.log(traces + 1e-12)
    gamma = float(torch.var(logs) / (torch.mean(logs).pow(2) + 1e-12)) if n >= 2 else math.nan
    flag = gamma > heterogeneity_threshold
    summed_covariance = weighted_sum = gram_sum = None
    for i in range(n):
        centred, covariance, task_eps = _centred_covariance(task_vector(i), flag, eps)
        if flag and not bool(centred.any()):
            warnings.warn(
                f"ACE-Merging: task {tasks[i] if tasks else f'number {i}'}'s update of {name!r} is zero once its "
                f"column means are removed, so the normalisation divides by a zero trace (+1e-12): its ridge "
                f"ε/1e-12 = {eps / 1e-12:g} dominates A and shrinks this tensor's merge towards 0. Kept as the "
                f"official code computes it.",
                stacklevel=2,
            )
        regularised = covariance + task_eps * torch.eye(covariance.shape[0], dtype=covariance.dtype)
        if weighted_sum is None:
            summed_covariance, weighted_sum, gram_sum = covariance.clone(), centred @ regularised, regularised
        else:
            summed_covariance += covariance
            weighted_sum += centred @ regularised
            gram_sum += regularised
    prior = torch.mean(summed_covariance, dim=0, keepdim=True)  # [1, d], broadcast over the rows of A
    if flag:
        prior = prior / (float(traces.mean()) + 1e-12)
    system = gram_sum + prior
    try:
        inverse = torch.linalg.inv(system)
    except RuntimeError:  # torch.linalg.LinAlgError: singular, as the official fallback
        inverse = torch.linalg.pinv(system)
    merged = weighted_sum @ inverse
    if not flag:
        return merged, gamma
    mean_covariance = gram_sum / n
    residual = torch.zeros_like(merged)
    for i in range(n):  # Ci again (the same bits), so that no list of n covariances is held
        tau = task_vector(i)
        residual += tau @ (_centred_covariance(tau, flag, eps)[1] - mean_covariance)
    U, S, Vh = torch.linalg.svd(residual + merged, full_matrices=False)
    k = int(S.numel() * k_frac)
    if k == 0:
        raise MergeFailed(
            f"ACE-Merging: tensor {name!r} ({S.numel()} singular values) takes the refinement path (γ = {gamma:.3g}) "
            f"with k = int({S.numel()} · k_frac {k_frac:g}) = 0 directions: the mean of no singular value is NaN. "
            f"Raise k_frac or the heterogeneity_threshold."
        )
    return merged + S[:k].mean() * (U[:, :k] @ Vh[:k, :]), gamma


def ace_task_vector(
    key: str, theta0: Tensor, thetas: Sequence[Tensor], eps: float = 0.01, k_frac: float = 0.3,
    heterogeneity_threshold: float = 0.3, covariance_side: str = "stored",
) -> tuple[Tensor, float | None]:
    """(τm, γ) of one key, τm float32 in θ0's shape; γ None for a tensor that is not 2-D (τm = mean τi)."""
    n = len(thetas)
    if theta0.dim() != 2:
        return (ordered_sum((theta - theta0).double() for theta in thetas) / n).to(theta0.dtype), None
    transpose = covariance_side == "input" and is_conv1d_weight(key)

    def task_vector(i: int) -> Tensor:
        tau = (thetas[i] - theta0).double()
        return tau.T if transpose else tau

    tasks = getattr(thetas, "tasks", None)
    merged, gamma = ace_tensor(task_vector, n, eps, k_frac, heterogeneity_threshold, key, tasks)
    return (merged.T if transpose else merged).contiguous().to(theta0.dtype), gamma


def ace_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 1.0,
    eps: float = 0.01, k_frac: float = 0.3, heterogeneity_threshold: float = 0.3,
    covariance_side: Literal["stored", "input"] = "stored",
) -> dict[str, Tensor]:
    """θ* = θ0 + scaling·τm over whole state dicts (the arguments as ``ACEMerging``'s)."""
    check_finetuned(pretrained, finetuned)
    merged = {}
    for key, theta0 in pretrained.items():
        thetas = [body[key] for body in finetuned.values()]
        tau, _ = ace_task_vector(key, theta0, thetas, eps, k_frac, heterogeneity_threshold, covariance_side)
        merged[key] = theta0 + scaling_factor * tau
    return merged


class ACEMerging(MergeMethod):
    """ACE-Merging: per 2-D tensor W0 = B A⁻¹ from covariances of the task vectors, refined spectrally
    when the tasks' magnitudes are heterogeneous; θ* = θ0 + scaling·τm.

    Args:
        scaling_factor: multiplies τm (official 1.0, no search).
        eps: ε, the ridge added to each covariance (official 0.01).
        k_frac: share of the singular values whose mean the refinement uses (official 0.3).
        heterogeneity_threshold: γ above which a tensor is normalised and refined (official 0.3).
        covariance_side: ``stored`` (official: the output side of GPT-2's Conv1D) or ``input`` (transposed first).
    """

    display_name = "ACE-Merging"
    symbols = {
        "scaling_factor": "λ", "eps": "ε", "k_frac": "k/r", "heterogeneity_threshold": "γ₀", "covariance_side": "side"
    }

    def __init__(
        self, pool: ModelPool, scaling_factor: float = 1.0, eps: float = 0.01, k_frac: float = 0.3,
        heterogeneity_threshold: float = 0.3, covariance_side: Literal["stored", "input"] = "stored",
    ):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
        self.eps = check_number(eps, "eps (ε)", 0)
        self.k_frac = check_number(k_frac, "k_frac", 0, 1)
        self.heterogeneity_threshold = check_number(heterogeneity_threshold, "heterogeneity_threshold", 0)
        self.covariance_side = check_choice(covariance_side, "covariance_side", COVARIANCE_SIDES)
        self.heterogeneity: dict[str, float] = {}  # 2-D key -> γ, for the keys this instance computed
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the pool and every argument but the scaling: a scaling sweep computes it once.
        arguments = (float(self.eps), float(self.k_frac), float(self.heterogeneity_threshold), self.covariance_side)
        return ("ace_task_vector", *arguments)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0 + self.scaling_factor * self.reused(key, lambda: self._task_vector(key, theta0, thetas))

    def _task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        args = (self.eps, self.k_frac, self.heterogeneity_threshold, self.covariance_side)
        tau, gamma = ace_task_vector(key, theta0, thetas, *args)
        if gamma is None:
            return tau
        self.heterogeneity[key] = gamma
        if len(self.heterogeneity) < sum(len(shape) == 2 for shape in self.pool.body_shapes().values()):
            return tau
        # The flag switches paths at γ = threshold: say how many took the refinement and how close any came.
        values, threshold = self.heterogeneity, self.heterogeneity_threshold
        flagged = [key for key, gamma in values.items() if gamma > threshold]
        finite = {key: gamma for key, gamma in values.items() if math.isfinite(gamma)}
        closest = min(finite, key=lambda key: abs(finite[key] - threshold)) if finite else None
        rank_zero_info(
            f"ACE-Merging: {len(flagged)} of {len(values)} 2-D tensors take the refinement path (γ > {threshold:g})"
            + (f"; closest to the threshold: {closest} (γ = {finite[closest]:.4f})." if closest else ".")
        )
        return tau
