"""Consensus Merging: keep only the entries of the multi-task vector that at least k tasks' TALL masks claim.

Wang, Dimitriadis et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, https://arxiv.org/abs/2405.07813 (official code: nik-dim/tall_masks).
θ* = θ0 + α·(τ_MTL ⊙ [Σt m_t ≥ k]), m_t = |θ0 − θt| > λ·|θ_MTL − θt|. Details: docs/methods.md.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import check_choice, check_integer, check_number
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import (
    TiesElection, check_finetuned, disjoint_merge, elect_sign, flatten, pool_task_vectors, tall_mask, task_vector_sum,
    ties_election, trim, unflatten,
)

BASES = ("task_arithmetic", "ties")
TIES_THRESHOLD = 20  # the official use_ties: top-20 % of each task vector, disjoint sum
TIES_MERGE_FUNC = "sum"


def consensus_mask(
    theta0: Tensor, thetas: Iterable[Tensor], tau_mtl: Tensor, tall_mask_lambda: float, min_agreement: int
) -> Tensor:
    """keep of one tensor (bool): [the number of tasks whose TALL mask holds the entry ≥ k]."""
    theta_mtl = theta0 + tau_mtl
    scale = torch.tensor(tall_mask_lambda, dtype=torch.float32)
    count = torch.zeros_like(theta0)  # exact small integers, as the official float counts
    for theta in thetas:  # one θt at a time
        count += tall_mask(theta0, theta, theta_mtl, scale)
    return count >= min_agreement


def consensus_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.3,
    tall_mask_lambda: float = 0.6, min_agreement: int = 2, base: Literal["task_arithmetic", "ties"] = "task_arithmetic",
) -> dict[str, Tensor]:
    """θ* = θ0 + α·(τ_MTL ⊙ keep) over whole state dicts (the arguments as ``ConsensusMerging``'s)."""
    check_finetuned(pretrained, finetuned)
    bodies = list(finetuned.values())
    if check_choice(base, "base", BASES) == "task_arithmetic":
        tau_mtl = {key: task_vector_sum(theta0, [body[key] for body in bodies]) for key, theta0 in pretrained.items()}
    else:  # TIES over the flat body: trim 20 %, elect, disjoint sum
        flat0 = flatten(pretrained)
        trimmed = [trim(flatten(body).sub_(flat0), TIES_THRESHOLD) for body in bodies]
        tau_mtl = unflatten(disjoint_merge(trimmed, elect_sign(trimmed), TIES_MERGE_FUNC), pretrained)
        del flat0, trimmed
    merged = {}
    for key, theta0 in pretrained.items():
        thetas = [body[key] for body in bodies]
        keep = consensus_mask(theta0, thetas, tau_mtl[key], tall_mask_lambda, min_agreement)
        merged[key] = theta0 + scaling_factor * (tau_mtl[key] * keep)
    return merged


class ConsensusMerging(MergeMethod):
    """Consensus Merging: θ* = θ0 + α·(τ_MTL ⊙ keep), keep = the entries at least k tasks' TALL masks hold.

    Args:
        scaling_factor: α, multiplies the kept multi-task vector (0.3, Task Arithmetic's default).
        tall_mask_lambda: λ of every task's TALL mask m_t = |θ0 − θt| > λ·|θ_MTL − θt| (0.6, FusionBench's).
        min_agreement: k, how many tasks' masks must hold an entry to keep it (official 2; 0 keeps all).
        base: τ_MTL: ``task_arithmetic`` (Σ τi) or ``ties`` (TIES's vector at threshold 20, disjoint sum).
    """

    display_name = "Consensus Merging"
    symbols = {"scaling_factor": "α", "tall_mask_lambda": "λ", "min_agreement": "k", "base": "base"}
    recommended = {"scaling_factor": 0.3, "tall_mask_lambda": 0.6, "min_agreement": 2}
    search = {"scaling_factor": LAMBDAS}

    def __init__(
        self, pool: ModelPool, scaling_factor: float = 0.3, tall_mask_lambda: float = 0.6, min_agreement: int = 2,
        base: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    ):
        super().__init__(pool)
        self.scaling_factor = check_number(scaling_factor, "scaling_factor (α)")
        self.tall_mask_lambda = check_number(tall_mask_lambda, "tall_mask_lambda (λ)", 0)
        self.min_agreement = check_integer(min_agreement, "min_agreement (k)", 0)
        self.base = check_choice(base, "base", BASES)
        self._election: TiesElection | None = None
        self.kept: dict[str, tuple[int, int]] = {}  # key -> (entries kept, entries)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τ_MTL ⊙ keep depends on the pool, λ, k and the base, not on α: an α sweep computes it once.
        return ("consensus_task_vector", self.base, float(self.tall_mask_lambda), self.min_agreement)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        kept = self.reused(key, lambda: self._kept_task_vector(key, theta0, thetas))
        return theta0 + self.scaling_factor * kept

    def _kept_task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if self.base == "task_arithmetic":
            tau_mtl = task_vector_sum(theta0, thetas)
        else:
            tau_mtl = self._ties_vector(key, theta0, thetas)
        keep = consensus_mask(theta0, thetas, tau_mtl, self.tall_mask_lambda, self.min_agreement)  # reads the θt again
        self.kept[key] = (int(keep.sum()), keep.numel())
        if key == self.pool.keys()[-1]:
            kept = sum(k for k, _ in self.kept.values()) / sum(n for _, n in self.kept.values())
            rank_zero_info(
                f"Consensus Merging (k = {self.min_agreement}, λ = {self.tall_mask_lambda:g}): "
                f"keeps {100 * kept:.1f} % of the entries."
            )
        return tau_mtl * keep

    def _ties_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if self._election is None:  # TIES's cuts and signs are over the whole body: one pass, on the first key
            self._election = ties_election(*pool_task_vectors(self.pool), TIES_THRESHOLD)
        merged = self._election.merged(key, theta0, thetas, TIES_MERGE_FUNC)
        if not self._election.signs:
            self._election = None  # every key merged: a new merge elects again
        return merged
