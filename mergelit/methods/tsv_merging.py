"""TSV-M (Task Singular Vectors: Merge): keep each task's top singular vectors, orthogonalise, recombine.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, https://arxiv.org/abs/2412.00081; as FusionBench's ``TaskSingularVectorMerging``. Per 2-D
tensor the top int(k/n) singular triplets of each τi are concatenated, both sides replaced by their polar
factors, τm = P_U diag(ŝ) P_Vᵀ; other tensors take the running mean. Details: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelit.errors import MergelitError, check_choice, check_number
from mergelit.linalg import (
    SVD_KEYS, TaskVectors, check_exclude_keys, numerical_rank, polar_factor, running_mean, svd_applies, thin_svd,
    warn_rank_deficient,
)
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned


def tsv_merge_tensor(
    task_vectors: Sequence[Tensor], name: str = "tensor", tasks: Sequence[str] | None = None
) -> Tensor:
    """τm of one 2-D tensor from τ1..τn (read once each); ``name`` and ``tasks`` name them in the warning."""
    n = len(task_vectors)
    names = list(tasks) if tasks is not None else [f"task {i + 1}" for i in range(n)]
    u_hat = s_hat = vh_hat = None
    ranks = {}
    for i, tau in enumerate(task_vectors):  # one τi at a time (TaskVectors computes it here)
        u, s, vh = thin_svd(tau)  # 1.
        if u_hat is None:
            dtype, r = tau.dtype, int(s.numel() * (1 / n))  # FusionBench's int(k · sv_reduction), sv_reduction = 1/n
            u_hat, s_hat, vh_hat = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        ranks[names[i]] = numerical_rank(s, tau.shape)
        del tau
        # 2. Its top r triplets into block i (k − n·r slots at the end stay 0).
        u_hat[:, i * r : (i + 1) * r] = u[:, :r]
        s_hat[i * r : (i + 1) * r] = s[:r]
        vh_hat[i * r : (i + 1) * r, :] = vh[:r, :]
        del u, s, vh
    advice = "Use svd_keys='conv1d' (averages wte and wpe) or exclude_keys for this tensor."
    warn_rank_deficient("TSV-M", name, r, ranks, advice)
    # 3. and 4.: τm = P_U diag(ŝ) P_Vᵀ (scaling the columns of P_U by ŝ is the product with diag(ŝ)).
    return (polar_factor(u_hat).mul_(s_hat) @ polar_factor(vh_hat)).to(dtype).contiguous()


def tsv_task_vector_tensor(
    key: str, theta0: Tensor, thetas: Sequence[Tensor], alpha: Sequence[float] | None = None,
    exclude_keys: Sequence[str] = (), svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
    tasks: Sequence[str] | None = None,
) -> Tensor:
    """τm of one key before the final scaling: TSV-M on an SVD key, the running mean elsewhere; τi = αi (θi − θ0)."""
    task_vectors = TaskVectors(theta0, thetas, alpha)  # computed when read: about one in memory at a time
    if svd_applies(key, theta0, svd_keys, exclude_keys):
        return tsv_merge_tensor(task_vectors, key, tasks)
    return running_mean(task_vectors)


def tsv_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], alpha: float | Sequence[float] = 1.0,
    exclude_keys: Sequence[str] | None = None, svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
) -> dict[str, Tensor]:
    """TSV-M over whole bodies (the arguments as ``TaskSingularVectorMerging``'s)."""
    alpha = _check_alpha(alpha, len(finetuned))
    check_choice(svd_keys, "svd_keys", SVD_KEYS)
    exclude_keys = list(exclude_keys or [])
    check_finetuned(pretrained, finetuned)
    check_exclude_keys(pretrained, exclude_keys)
    weights, tasks, merged = alpha if isinstance(alpha, list) else None, list(finetuned), {}
    for key, theta0 in pretrained.items():
        thetas = [body[key] for body in finetuned.values()]
        tau = tsv_task_vector_tensor(key, theta0, thetas, weights, exclude_keys, svd_keys, tasks)
        merged[key] = theta0 + tau if weights is not None else theta0 + alpha * tau  # weights: no final scaling
    return merged


def _check_alpha(alpha: float | Sequence[float], num_tasks: int) -> float | list[float]:
    """α: a finite number, or a list of one finite number per task."""
    if isinstance(alpha, (list, tuple)):
        if len(alpha) != num_tasks:
            raise MergelitError(
                f"alpha (α) as a list needs one finite number per task ({num_tasks}, in task order); got {list(alpha)}."
            )
        return [check_number(a, f"alpha[{i}] (α of task {i + 1})") for i, a in enumerate(alpha)]
    return check_number(alpha, "alpha (α, a number or a list of one number per task)")


class TaskSingularVectorMerging(MergeMethod):
    """TSV-M: θ* = θ0 + α τm, τm = P_U diag(ŝ) P_Vᵀ from each task's top 1/n singular vectors, orthogonalised.

    Args:
        alpha: α, scales τm (FusionBench's 1), or one weight per task scaling each τi first (no final scaling).
        exclude_keys: exact state-dict keys (e.g. ``wpe.weight``) averaged instead of SVD'd.
        svd_keys: ``all_2d`` (FusionBench: wte and wpe too) or ``conv1d`` (wte and wpe averaged).
    """

    display_name = "TSV-M"
    symbols = {"alpha": "α"}
    recommended = {"alpha": 1.0}
    search = {"alpha": [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]}

    def __init__(
        self, pool: ModelPool, alpha: float | list[float] = 1.0, exclude_keys: list[str] | None = None,
        svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
    ):
        super().__init__(pool)
        self.alpha = _check_alpha(alpha, len(pool.tasks))
        self.exclude_keys = list(exclude_keys or [])
        self.svd_keys = check_choice(svd_keys, "svd_keys", SVD_KEYS)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple | None:
        # τm does not depend on a number α (an α sweep computes it once); a per-task α list scales the τi first.
        key = ("tsv_task_vector", tuple(sorted(self.exclude_keys)), self.svd_keys)
        return None if isinstance(self.alpha, list) else key

    def prepare_merge(self) -> None:
        check_exclude_keys(self.pool.keys(), self.exclude_keys)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        def task_vector(alpha: list[float] | None) -> Tensor:
            return tsv_task_vector_tensor(key, theta0, thetas, alpha, self.exclude_keys, self.svd_keys, self.tasks)

        if isinstance(self.alpha, list):  # the αi scale each τi before the SVDs: no final scaling
            return theta0 + task_vector(self.alpha)
        return theta0 + self.alpha * self.reused(key, lambda: task_vector(None))
