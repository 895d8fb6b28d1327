"""TSV-M (Task Singular Vectors: Merge): keep each task's top singular vectors, orthogonalise, recombine.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, https://arxiv.org/abs/2412.00081.

With τi = θi − θ0 and n tasks, per tensor in state-dict order:

- 2-D tensors (FusionBench: every 2-D tensor, i.e. wte, wpe and the 48 Conv1D weights):
  k = min(rows, cols), r = int(k · (1/n)) (GPT-2 small: 109 of 768, slots 763..767 stay 0).
  1. SVD each task vector, τi = Ui diag(si) Viᵀ, and keep its top r triplets;
  2. concatenate them: Û[:, i·r:(i+1)·r] = Ui[:, :r], ŝ[i·r:(i+1)·r] = si[:r], V̂ᵀ likewise;
  3. orthogonalise both sides by their polar factors, P_U = A Bᵀ from Û = A Σ Bᵀ (and P_Vᵀ);
  4. τm = P_U diag(ŝ) P_Vᵀ.
- Every other tensor (LayerNorm, biases, ``exclude_keys``): the running mean m ← τ1,
  m ← m + (τi − m)/i (FusionBench's; it differs from Σ τi / n in the last bit).

θ* = θ0 + α τm on every key (the means too). With α a list of n numbers, τi ← αi τi before
everything and there is no final scaling. The result does not depend on the SVDs' sign choices,
and it is transpose-equivariant (the SVD transposes, the polar factors swap), so GPT-2's Conv1D
[in, out] storage needs no transpose.

What differs from FusionBench (``TaskSingularVectorMerging``), and why:
- ``svd_keys: conv1d`` (an option; the default ``all_2d`` is FusionBench's) SVDs only the 48
  Conv1D weights and averages wte and wpe like the 1-D tensors. If a task vector has numerical
  rank below r (likely for wpe: positions no training text reached get no gradient), its top-r
  block holds arbitrary singular vectors that change the polar factors of every other
  column, so FusionBench's wpe then depends on the device and LAPACK build. mergelit warns
  (``IllPosedMergeWarning``, naming the tensor and tasks) whenever that happens.
- SVDs of wide matrices (c_attn [768, 2304], c_fc [768, 3072]) are taken of the transpose: the
  same factors up to sign and rounding, about 2.5× faster with CPU LAPACK.
- Unknown ``exclude_keys`` raise instead of being ignored (a typo would silently SVD the tensor).
- ``return_single_task_models`` is not offered.

Cost (``benchmarks/svd_method_cost.py``): n + 2 thin SVDs per SVD'd tensor; on GPT-2 small the
9 SVDs of wte [50257, 768] dominate a one-layer body (≈ 47 s of 61 s, one CPU thread).

The maths is per key, so a streaming merge can feed it one tensor at a time:
``tsv_merge_tensor`` (a 2-D key) or ``running_mean`` (the others), as ``svd_applies`` decides.
The task vectors of a key are computed when read (``LazyTaskVectors``), so a merge holds about
one of them at a time. The helpers ``thin_svd``, ``polar_factor``, ``numerical_rank``,
``LazyTaskVectors`` and ``svd_applies`` are shared with Iso-C / Iso-CTS
(``mergelit.methods.iso``) and CART.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import add_scaled, check_finetuned

SVD_KEYS = ("all_2d", "conv1d")


class IllPosedMergeWarning(UserWarning):
    """A task vector (or a sum of them) has fewer non-zero singular values than the merge keeps:
    the kept singular vectors for the zero ones are arbitrary, so the merged tensor depends on the
    device and the LAPACK build."""


# ---- helpers shared with Iso-C / Iso-CTS -----------------------------------------------------


def svd_applies(key: str, tensor: Tensor, svd_keys: str, exclude_keys: Sequence[str] = ()) -> bool:
    """Whether the SVD path handles ``key``: 2-D, not excluded, and a Conv1D weight if ``svd_keys`` is ``conv1d``."""
    if tensor.dim() != 2 or key in exclude_keys:
        return False
    return svd_keys == "all_2d" or is_conv1d_weight(key)


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` in float32 (float64 kept), U [rows, k], S [k], Vᵀ [k, cols].

    A wide matrix is decomposed through its transpose: the same factors up to sign and rounding,
    and CPU LAPACK is 2.5-3× faster on a tall matrix (768 × 2304: 0.39 s wide, 0.16 s tall).
    """
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.float()  # LAPACK has no half precision (FusionBench upcasts too)
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(matrix, full_matrices=False)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor A Bᵀ of ``matrix`` = A Σ Bᵀ: the nearest matrix with orthonormal
    columns (or rows), which is how TSV-M and Iso-CTS orthogonalise the concatenated vectors."""
    u, _, vh = thin_svd(matrix)
    return u @ vh


def numerical_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """Number of singular values above max(s) · max(shape) · eps (``torch.linalg.matrix_rank``'s default)."""
    if singular_values.numel() == 0:
        return 0
    tolerance = singular_values.max() * max(shape) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tolerance).sum())


def warn_rank_deficient(method: str, name: str, kept: int, ranks: dict[str, int], advice: str) -> None:
    """Warn once for tensor ``name`` about the parts (task -> numerical rank) whose rank is below ``kept``."""
    low = {part: rank for part, rank in ranks.items() if rank < kept}
    if low:
        listed = ", ".join(f"{part} (rank {rank})" for part, rank in low.items())
        warnings.warn(
            f"{method}: {name!r} keeps {kept} singular vectors per part but {listed} "
            f"{'has' if len(low) == 1 else 'have'} fewer non-zero singular values; the vectors kept for "
            f"the zero ones are arbitrary, so the merged {name!r} depends on the device and LAPACK build. "
            f"{advice}",
            IllPosedMergeWarning,
            stacklevel=3,
        )


class LazyTaskVectors(Sequence):
    """τi = αi (θi − θ0) for one tensor, computed each time it is read instead of stored.

    A key's n task vectors then cost about one tensor at a time (wte: 154 MB, not 7 × 154 MB);
    a second pass over them (Iso-CTS, CART) recomputes the subtractions, bit for bit the same.

    Args:
        pretrained: θ0 for this tensor.
        finetuned: θ1..θn for this tensor.
        weights: αi per task, or None (all 1).
    """

    def __init__(self, pretrained: Tensor, finetuned: Sequence[Tensor], weights: Sequence[float] | None = None):
        self.pretrained, self.finetuned, self.weights = pretrained, list(finetuned), weights

    def __len__(self) -> int:
        return len(self.finetuned)

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, slice):
            raise TypeError("LazyTaskVectors are read one at a time (a slice would hold them all).")
        tau = self.finetuned[index] - self.pretrained
        return tau if self.weights is None else tau.mul_(self.weights[index])

    def transposed(self) -> LazyTaskVectors:
        """The same task vectors, transposed (views: nothing is copied)."""
        return LazyTaskVectors(self.pretrained.T, [t.T for t in self.finetuned], self.weights)


def running_mean(tensors: Sequence[Tensor]) -> Tensor:
    """m ← t1, m ← m + (ti − m)/i: FusionBench's mean of the non-SVD keys (a new tensor)."""
    mean = None
    for i, tensor in enumerate(tensors, start=1):
        mean = tensor.clone() if mean is None else mean.add_((tensor - mean) / i)
    return mean


def check_exclude_keys(pretrained: dict[str, Tensor], exclude_keys: Sequence[str]) -> None:
    """Raise ``ValueError`` for an ``exclude_keys`` entry that is not a tensor of the body (exact names)."""
    unknown = [key for key in exclude_keys if key not in pretrained]
    if unknown:
        raise ValueError(
            f"exclude_keys names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a tensor of the body; "
            f"give exact state-dict keys such as 'wte.weight' or 'wpe.weight'."
        )


# ---- TSV-M -----------------------------------------------------------------------------------


def _task_names(count: int, tasks: Sequence[str] | None) -> list[str]:
    return list(tasks) if tasks is not None else [f"task {i + 1}" for i in range(count)]


def tsv_merge_tensor(
    task_vectors: Sequence[Tensor], name: str = "tensor", tasks: Sequence[str] | None = None
) -> Tensor:
    """τm for one 2-D tensor: top-r SVD triplets of each τi, concatenated, orthogonalised, recombined.

    Args:
        task_vectors: τ1..τn for this tensor, all the same 2-D shape (not modified).
        name: the tensor's key, for the rank-deficiency warning.
        tasks: the task names, for the warning (default "task 1", "task 2", ...).
    """
    n = len(task_vectors)
    names = _task_names(n, tasks)
    u_hat = s_hat = vh_hat = None
    ranks = {}
    for i, tau in enumerate(task_vectors):  # one τi at a time (LazyTaskVectors computes it here)
        # 1. SVD each task vector.
        u, s, vh = thin_svd(tau)
        if u_hat is None:
            dtype, r = tau.dtype, int(s.numel() * (1 / n))  # FusionBench's int(k · sv_reduction), sv_reduction = 1/n
            u_hat, s_hat, vh_hat = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        ranks[names[i]] = numerical_rank(s, tau.shape)
        del tau
        # 2. Concatenate its top r triplets into block i (k − n·r slots at the end stay 0).
        u_hat[:, i * r : (i + 1) * r] = u[:, :r]
        s_hat[i * r : (i + 1) * r] = s[:r]
        vh_hat[i * r : (i + 1) * r, :] = vh[:r, :]
        del u, s, vh
    warn_rank_deficient(
        "TSV-M", name, r, ranks, "Use svd_keys='conv1d' (averages wte and wpe) or exclude_keys for this tensor."
    )
    # 3. Orthogonalise both sides (polar factors): the blocks of different tasks overlap.
    # 4. τm = P_U diag(ŝ) P_Vᵀ (scaling the columns of P_U by ŝ is the product with diag(ŝ)).
    merged = polar_factor(u_hat).mul_(s_hat) @ polar_factor(vh_hat)
    return merged.to(dtype).contiguous()


def tsv_task_vector(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    alpha: Sequence[float] | None = None,
    exclude_keys: Sequence[str] = (),
    svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
) -> dict[str, Tensor]:
    """τm for every key (before the final scaling): TSV-M on the SVD keys, the running mean elsewhere.

    Args:
        pretrained: θ0.
        finetuned: task -> θi.
        alpha: per-task weights αi applied to τi before merging (None: all 1).
        exclude_keys: exact keys that take the running mean instead of the SVD path.
        svd_keys: ``all_2d`` (FusionBench: wte, wpe and the Conv1D weights) or ``conv1d``.
    """
    check_finetuned(pretrained, finetuned)
    check_exclude_keys(pretrained, exclude_keys)
    if alpha is not None and len(alpha) != len(finetuned):
        raise ValueError(f"alpha (α) has {len(alpha)} weights for {len(finetuned)} tasks; give one per task.")
    tasks = list(finetuned)
    merged = {}
    for key, base in pretrained.items():
        # τi = αi (θi − θ0), computed when read: about one task vector in memory at a time.
        task_vectors = LazyTaskVectors(base, [body[key] for body in finetuned.values()], alpha)
        if svd_applies(key, base, svd_keys, exclude_keys):
            merged[key] = tsv_merge_tensor(task_vectors, key, tasks)
        else:
            merged[key] = running_mean(task_vectors)
    return merged


def tsv_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    alpha: float | Sequence[float] = 1.0,
    exclude_keys: Sequence[str] | None = None,
    svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
) -> dict[str, Tensor]:
    """θ* = θ0 + α τm (α a number), or θ0 + τm of the αi-scaled task vectors (α a list of n numbers).

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        alpha: α, a number (scales τm on every key) or one weight per task.
        exclude_keys: exact keys averaged instead of SVD'd (None: none).
        svd_keys: ``all_2d`` (FusionBench) or ``conv1d`` (wte and wpe averaged).
    """
    alpha = _check_arguments(alpha, len(finetuned), svd_keys)
    exclude_keys = list(exclude_keys or [])
    if isinstance(alpha, list):
        merged_tau = tsv_task_vector(pretrained, finetuned, alpha, exclude_keys, svd_keys)
        return {key: pretrained[key] + tau for key, tau in merged_tau.items()}
    return add_scaled(pretrained, tsv_task_vector(pretrained, finetuned, None, exclude_keys, svd_keys), alpha)


def _check_arguments(alpha: float | Sequence[float], num_tasks: int, svd_keys: str) -> float | list[float]:
    if svd_keys not in SVD_KEYS:
        raise ValueError(f"svd_keys must be one of {', '.join(SVD_KEYS)}; got {svd_keys!r}.")
    if isinstance(alpha, bool):
        raise ValueError(f"alpha (α) must be a number or a list of {num_tasks} numbers, got {alpha!r}.")
    if isinstance(alpha, (int, float)):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha (α) must be a finite number, got {alpha}.")
        return float(alpha)
    alpha = list(alpha)
    if len(alpha) != num_tasks or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in alpha):
        raise ValueError(
            f"alpha (α) as a list needs one finite number per task ({num_tasks}, in task order); got {alpha}."
        )
    return [float(a) for a in alpha]


class TaskSingularVectorMerging(MergeMethod):
    """TSV-M: θ* = θ0 + α τm, τm = P_U diag(ŝ) P_Vᵀ from each task's top 1/n singular vectors, orthogonalised.

    Per 2-D tensor, each task vector keeps its top int(k/n) singular triplets; the concatenated
    left and right singular vectors are replaced by their polar factors (the nearest orthonormal
    sets) and recombined with the kept singular values. Other tensors take the running mean.

    Args:
        alpha: α. A number scales the merged task vector on every key (FusionBench's default 1,
            which the paper picks on validation data from 0.1..3.0). A list of one weight per
            task (in task order) scales each τi before the merge, with no final scaling.
        exclude_keys: exact state-dict keys (e.g. ``wpe.weight``) averaged instead of SVD'd.
        svd_keys: which 2-D tensors are SVD'd. ``all_2d`` (default, FusionBench): wte, wpe and
            the 48 Conv1D weights. ``conv1d``: only the Conv1D weights; wte and wpe take the
            running mean × α, which avoids the ill-posed SVD of a rank-deficient τ_wpe.
    """

    display_name = "TSV-M"
    symbols = {"alpha": "α"}
    recommended = {"alpha": 1.0}
    kind = "merged"

    def __init__(
        self,
        pool: ModelPool,
        alpha: float | list[float] = 1.0,
        exclude_keys: list[str] | None = None,
        svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
    ):
        super().__init__(pool)
        self.alpha = _check_arguments(alpha, len(pool.tasks), svd_keys)
        self.exclude_keys = list(exclude_keys or [])
        self.svd_keys = svd_keys
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple | None:
        # τm depends on the pool, exclude_keys and svd_keys, not on a number α: an α sweep computes it
        # once. A per-task α list scales the task vectors before the SVDs, so nothing is reusable.
        if isinstance(self.alpha, list):
            return None
        return ("tsv_task_vector", tuple(sorted(self.exclude_keys)), self.svd_keys)

    def merge(self) -> dict[str, Tensor]:
        pretrained = self.pool.pretrained_body()
        if isinstance(self.alpha, list):
            return tsv_merge(pretrained, self.pool.finetuned_bodies(), self.alpha, self.exclude_keys, self.svd_keys)
        if self.reusable is None:
            self.reusable = tsv_task_vector(
                pretrained, self.pool.finetuned_bodies(), None, self.exclude_keys, self.svd_keys
            )
        return add_scaled(pretrained, self.reusable, self.alpha)
