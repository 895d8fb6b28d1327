"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces.

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959.

With τi = θi − θ0, per key θ* = θ0 + α τm. Iso-C on a 2-D tensor: Σi τi = U diag(s) Vᵀ and
τm = s̄ U Vᵀ, s̄ the mean of all k = min(rows, cols) singular values (a flat spectrum). Iso-CTS: the
top c triplets of Σi τi (common) beside each task's top d triplets of wi = τi − Uc (Ucᵀ τi) (the
common column space projected out), both sides orthogonalised by their polar factors, τm = s̄ P_U P_Vᵀ
(``iso_cts_sizes`` gives c and d; f = 1 gives d = 0, Iso-C). Other tensors: Σ τi / n (Iso-C), the
running mean (Iso-CTS). FusionBench's ``iso_c`` / ``iso_cts`` by default; what differs (the side
Iso-CTS projects on GPT-2's [in, out] Conv1D) and the cost: docs/methods.md, "Iso-C and Iso-CTS".
Each τi is read when needed (``TaskVectors``), so a merge holds about one task vector at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelit.errors import check_choice, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.linalg import (
    SVD_KEYS,
    TaskVectors,
    check_exclude_keys,
    numerical_rank,
    ordered_sum,
    polar_factor,
    running_mean,
    svd_applies,
    thin_svd,
    warn_rank_deficient,
)
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned

PROJECTION_SIDES = ("fusionbench", "paper")

_ADVICE = "Use svd_keys='conv1d' (averages wte and wpe) or exclude_keys for this tensor."


def _check_arguments(
    scaling_factor: float, common_space_fraction: float = 1.0, svd_keys: str = "all_2d",
    projection_side: str = "fusionbench",
) -> float:
    """Check every argument; return α as a float."""
    fraction = "common_space_fraction (f: 1 gives Iso-C; FusionBench's default is 0.8)"
    check_number(common_space_fraction, fraction, 0, 1, low_open=True)
    check_choice(svd_keys, "svd_keys", SVD_KEYS)
    check_choice(projection_side, "projection_side", PROJECTION_SIDES)
    return check_number(scaling_factor, "scaling_factor (α)")


# ---- Iso-C -----------------------------------------------------------------------------------
def iso_c_merge_tensor(task_vectors: Sequence[Tensor], name: str = "tensor") -> Tensor:
    """τm = s̄ U Vᵀ for one 2-D tensor, U diag(s) Vᵀ = Σ τi (``task_vectors``, not modified), s̄ = mean(s);
    ``name`` is for the rank-deficiency warning."""
    n = len(task_vectors)
    # FusionBench averages every key first and multiplies the 2-D ones back by n: (Σ/n)·n, not Σ bitwise.
    total = ordered_sum(task_vectors) / n * n
    u, s, vh = thin_svd(total)
    # Every singular value becomes s̄, the zero ones too: their (arbitrary) vectors then count.
    warn_rank_deficient("Iso-C", name, s.numel(), {"Σ τi": numerical_rank(s, total.shape)}, _ADVICE)
    merged = u.mul_(s.mean()) @ vh  # U diag(s̄·1) Vᵀ
    return merged.to(total.dtype).contiguous()


def iso_c_task_vector_tensor(
    key: str, theta0: Tensor, thetas: Sequence[Tensor], exclude_keys: Sequence[str] = (),
    svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
) -> Tensor:
    """Iso-C's τm of one key (before α): s̄ U Vᵀ of Σ τi on an SVD key, Σ τi / n elsewhere."""
    task_vectors = TaskVectors(theta0, thetas)  # τi = θi − θ0, computed when read
    if svd_applies(key, theta0, svd_keys, exclude_keys):
        return iso_c_merge_tensor(task_vectors, key)
    return ordered_sum(task_vectors) / len(task_vectors)


def iso_c_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 1.0,
    exclude_keys: Sequence[str] | None = None, svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
) -> dict[str, Tensor]:
    """Iso-C: θ* = θ0 + α τm over whole bodies (arguments as ``IsoC``'s; exclude_keys None: none)."""
    scaling_factor = _check_arguments(scaling_factor, svd_keys=svd_keys)
    exclude_keys = list(exclude_keys or [])
    check_finetuned(pretrained, finetuned)
    check_exclude_keys(pretrained, exclude_keys)
    merged_tau = {
        key: iso_c_task_vector_tensor(key, base, [body[key] for body in finetuned.values()], exclude_keys, svd_keys)
        for key, base in pretrained.items()
    }
    return {key: pretrained[key] + scaling_factor * tau for key, tau in merged_tau.items()}


# ---- Iso-CTS ---------------------------------------------------------------------------------
def iso_cts_sizes(k: int, n: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, d), c + n·d = k: c = int(k·f), t = round((k − c)/n)·n (Python's round, half to even), c = k − t,
    d = t/n (k = 768, n = 7, f = 0.8: (614, 22))."""
    common = int(k * common_space_fraction)
    task_total = round((k - common) / n) * n
    common = k - task_total
    if common < 0:
        raise ValueError(
            f"common_space_fraction {common_space_fraction} leaves a negative common subspace ({common}) for a "
            f"tensor of rank {k} and {n} tasks; raise common_space_fraction."
        )
    return common, int((k - common) / n)


def iso_cts_merge_tensor(
    task_vectors: Sequence[Tensor], common_space_fraction: float = 0.8, name: str = "tensor",
    tasks: Sequence[str] | None = None,
) -> Tensor:
    """Iso-CTS's τm for one 2-D tensor (τ1..τn, not modified), projecting the common subspace out of the
    row-index side as stored; ``name`` and ``tasks`` (default "task 1", ...) are for the warnings."""
    n = len(task_vectors)
    names = list(tasks) if tasks is not None else [f"task {i + 1}" for i in range(n)]
    total = ordered_sum(task_vectors)
    shape, dtype = total.shape, total.dtype
    # 1. Sizes.
    c, d = iso_cts_sizes(min(shape), n, common_space_fraction)
    # 2. Common subspace: the top c singular triplets of the sum.
    u, s, vh = thin_svd(total)
    del total
    warn_rank_deficient("Iso-CTS", name, c, {"Σ τi": numerical_rank(s, shape)}, _ADVICE)
    u_common = u[:, :c]
    u_hat, s_hat, vh_hat = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    # 3. Task-specific subspaces (none when d = 0, i.e. f = 1: Iso-C).
    ranks = {}
    for i, tau in enumerate(task_vectors if d > 0 else []):  # a second pass: TaskVectors reads τi again
        tau = tau.to(u.dtype)
        # wi = τi − Uc Ucᵀ τi, evaluated as Uc (Ucᵀ τi): never the rows × rows projector (9.4 GiB for wte).
        specific = tau - u_common @ (u_common.T @ tau)
        u_i, s_i, vh_i = thin_svd(specific)
        ranks[names[i]] = numerical_rank(s_i, shape)
        # 4. Concatenate: task i's top d triplets into slots [i·d, (i+1)·d).
        u_hat[:, i * d : (i + 1) * d] = u_i[:, :d]
        s_hat[i * d : (i + 1) * d] = s_i[:d]
        vh_hat[i * d : (i + 1) * d, :] = vh_i[:d, :]
        del tau, specific, u_i, s_i, vh_i
    warn_rank_deficient("Iso-CTS", name, d, ranks, _ADVICE)
    # ... and the common triplets into slots [n·d, k).
    u_hat[:, n * d :] = u_common
    s_hat[n * d :] = s[:c]
    vh_hat[n * d :, :] = vh[:c, :]
    del u, vh, u_common
    # 5. Orthogonalise both sides, flatten the spectrum to its mean: τm = s̄ P_U P_Vᵀ.
    merged = polar_factor(u_hat).mul_(s_hat.mean()) @ polar_factor(vh_hat)
    return merged.to(dtype).contiguous()


def iso_cts_task_vector_tensor(
    key: str, theta0: Tensor, thetas: Sequence[Tensor], common_space_fraction: float = 0.8,
    exclude_keys: Sequence[str] = (), svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
    projection_side: Literal["fusionbench", "paper"] = "fusionbench", tasks: Sequence[str] | None = None,
) -> Tensor:
    """Iso-CTS's τm of one key (before α): ``iso_cts_merge_tensor`` on an SVD key, the running mean elsewhere."""
    task_vectors = TaskVectors(theta0, thetas)  # τi = θi − θ0, computed when read (twice here)
    if not svd_applies(key, theta0, svd_keys, exclude_keys):
        return running_mean(task_vectors)
    if projection_side == "paper" and is_conv1d_weight(key):
        # GPT-2's Conv1D stores W as [in, out]; the paper's nn.Linear weights are [out, in].
        return iso_cts_merge_tensor(task_vectors.transposed(), common_space_fraction, key, tasks).T.contiguous()
    return iso_cts_merge_tensor(task_vectors, common_space_fraction, key, tasks)


def iso_cts_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8, exclude_keys: Sequence[str] | None = None,
    svd_keys: Literal["all_2d", "conv1d"] = "all_2d", projection_side: Literal["fusionbench", "paper"] = "fusionbench",
) -> dict[str, Tensor]:
    """Iso-CTS: θ* = θ0 + α τm over whole bodies (arguments as ``IsoCTS``'s; exclude_keys None: none)."""
    scaling_factor = _check_arguments(scaling_factor, common_space_fraction, svd_keys, projection_side)
    exclude_keys = list(exclude_keys or [])
    check_finetuned(pretrained, finetuned)
    check_exclude_keys(pretrained, exclude_keys)
    tasks = list(finetuned)
    merged_tau = {
        key: iso_cts_task_vector_tensor(
            key, base, [body[key] for body in finetuned.values()], common_space_fraction, exclude_keys, svd_keys,
            projection_side, tasks,
        )
        for key, base in pretrained.items()
    }
    return {key: pretrained[key] + scaling_factor * tau for key, tau in merged_tau.items()}


class IsoC(MergeMethod):
    """Iso-C: θ* = θ0 + α s̄ U Vᵀ, U diag(s) Vᵀ = Σ τi, s̄ = mean(s): the summed task vector's spectrum flattened.

    Args:
        scaling_factor: α, multiplies the merged task vector on every key (FusionBench's default
            1.0; the paper picks it on validation data from 0.1..3.0).
        exclude_keys: exact state-dict keys (e.g. ``wpe.weight``) averaged instead of SVD'd.
        svd_keys: ``all_2d`` (default, FusionBench): wte, wpe and the 48 Conv1D weights are SVD'd;
            ``conv1d``: only the Conv1D weights, wte and wpe take the mean × α (which avoids lifting a
            rank-deficient τ_wpe along arbitrary directions).
    """

    display_name = "Iso-C"
    symbols = {"scaling_factor": "α"}
    recommended = {"scaling_factor": 1.0}
    search = {"scaling_factor": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 1.0,
        exclude_keys: list[str] | None = None,
        svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
    ):
        super().__init__(pool)
        self.scaling_factor = _check_arguments(scaling_factor, svd_keys=svd_keys)
        self.exclude_keys = list(exclude_keys or [])
        self.svd_keys = svd_keys
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the pool, exclude_keys and svd_keys, not on α: an α sweep computes it once.
        return ("iso_c_task_vector", tuple(sorted(self.exclude_keys)), self.svd_keys)

    def prepare_merge(self) -> None:
        check_exclude_keys(self.pool.keys(), self.exclude_keys)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        merged = self.reused(
            key, lambda: iso_c_task_vector_tensor(key, theta0, thetas, self.exclude_keys, self.svd_keys)
        )
        return theta0 + self.scaling_factor * merged


class IsoCTS(MergeMethod):
    """Iso-CTS: θ* = θ0 + α s̄ P_U P_Vᵀ over the common subspace of Σ τi plus each task's own subspace
    orthogonal to it, orthogonalised, with a flat spectrum.

    Args:
        scaling_factor: α, multiplies the merged task vector on every key (FusionBench's default 1.0).
        common_space_fraction: f in (0, 1], the share of each tensor's k = min(rows, cols) directions
            taken from the sum's top singular vectors, the rest split equally among the tasks (0.8: 614
            common + 7 × 22 task directions of 768). 1 gives Iso-C.
        exclude_keys: exact state-dict keys averaged instead of SVD'd.
        svd_keys: ``all_2d`` (default, FusionBench: wte, wpe and the 48 Conv1D weights) or ``conv1d``
            (wte and wpe take the running mean × α).
        projection_side: the side of a Conv1D weight that loses the common subspace: ``fusionbench``
            (default), the input side, as FusionBench's code on GPT-2's [in, out] storage; ``paper``, the
            output side, as the paper's code on nn.Linear ([out, in]). wte and wpe: as stored either way.
    """

    display_name = "Iso-CTS"
    symbols = {"scaling_factor": "α", "common_space_fraction": "f"}
    recommended = {"scaling_factor": 1.0, "common_space_fraction": 0.8}
    search = {"scaling_factor": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 1.0,
        common_space_fraction: float = 0.8,
        exclude_keys: list[str] | None = None,
        svd_keys: Literal["all_2d", "conv1d"] = "all_2d",
        projection_side: Literal["fusionbench", "paper"] = "fusionbench",
    ):
        super().__init__(pool)
        self.scaling_factor = _check_arguments(scaling_factor, common_space_fraction, svd_keys, projection_side)
        self.common_space_fraction = float(common_space_fraction)
        self.exclude_keys = list(exclude_keys or [])
        self.svd_keys = svd_keys
        self.projection_side = projection_side
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the pool and every argument but α: an α sweep computes it once.
        excluded = tuple(sorted(self.exclude_keys))
        return ("iso_cts_task_vector", self.common_space_fraction, excluded, self.svd_keys, self.projection_side)

    def prepare_merge(self) -> None:
        check_exclude_keys(self.pool.keys(), self.exclude_keys)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        merged = self.reused(key, lambda: self._task_vector(key, theta0, thetas))
        return theta0 + self.scaling_factor * merged

    def _task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return iso_cts_task_vector_tensor(
            key, theta0, thetas, self.common_space_fraction, self.exclude_keys, self.svd_keys, self.projection_side,
            self.tasks,
        )
