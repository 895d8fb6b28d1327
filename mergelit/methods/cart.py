"""CART: Centred Arithmetic with Rank-reduced Task vectors.

Choi, Kim, Lee & Hong 2024, "Revisiting Weight Averaging for Model Merging",
https://arxiv.org/abs/2412.12153 (code: JH-GEECS/CART). θ̄ = θ0 + (1/n) Σi τi; on the Conv1D weights
θ* = θ̄ + λ Σi lowrank_r(τi + θ0 − θ̄), r = max(1, int(ρ·min(rows, cols))); θ̄ elsewhere. Details:
docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergelit.errors import check_number
from mergelit.linalg import TaskVectors, low_rank, ordered_sum
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned


def cart_low_rank_applies(key: str, tensor: Tensor) -> bool:
    """CART's key rule on a matrix (the original tests only the name; the 2-D check guards the SVD)."""
    by_name = ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)
    return by_name and tensor.dim() == 2


def cart_rank(k: int, rank_ratio: float) -> int:
    """r = max(1, int(ρ·k)): the number of singular triplets each centred task vector keeps."""
    return max(1, int(rank_ratio * k))


def cart_components(
    pretrained: Tensor, task_vectors: Sequence[Tensor], rank_ratio: float, reduce_rank: bool
) -> tuple[Tensor, Tensor]:
    """(θ̄, Σi lowrank(τ'i)) of one tensor, the λ-free parts (τ'i in full unless ``reduce_rank``); reads τi twice."""
    # 1. θ̄ = θ0 + (1/n) Σ τi (as the original: from the task vectors, not the mean of θi).
    average = pretrained + ordered_sum(task_vectors) / len(task_vectors)
    rank = cart_rank(min(pretrained.shape), rank_ratio) if reduce_rank else None
    correction = torch.zeros_like(pretrained)
    for tau in task_vectors:
        centred = tau + pretrained - average  # 2. τ'i = τi + θ0 − θ̄
        correction += low_rank(centred, rank) if reduce_rank else centred  # 3.
        del tau, centred
    return average, correction


def cart_parts_tensor(key: str, theta0: Tensor, thetas: Sequence[Tensor], rank_ratio: float = 0.12) -> tuple:
    """``cart_components`` of one key, τi = θi − θ0 computed when read: what a λ sweep reuses."""
    return cart_components(theta0, TaskVectors(theta0, thetas), rank_ratio, cart_low_rank_applies(key, theta0))


def cart_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 2.0,
    rank_ratio: float = 0.12,
) -> dict[str, Tensor]:
    """θ* = θ̄ + λ Σi lowrank(τ'i) over whole bodies (the arguments as ``CART``'s)."""
    scaling_factor, rank_ratio = _check_arguments(scaling_factor, rank_ratio)
    check_finetuned(pretrained, finetuned)
    merged = {}
    for key, theta0 in pretrained.items():
        average, correction = cart_parts_tensor(key, theta0, [body[key] for body in finetuned.values()], rank_ratio)
        merged[key] = average + scaling_factor * correction  # 4.
    return merged


def _check_arguments(scaling_factor: float, rank_ratio: float) -> tuple[float, float]:
    name = (
        "rank_ratio (ρ: each centred task vector keeps max(1, int(ρ·k)) of its k singular triplets; "
        "1 gives the simple average)"
    )
    rank_ratio = check_number(rank_ratio, name, 0, 1, low_open=True)
    return check_number(scaling_factor, "scaling_factor (λ)"), rank_ratio


class CART(MergeMethod):
    """CART: θ* = θ̄ + λ Σi lowrank(τ'i), the simple average θ̄ plus the low-rank parts of the task
    vectors centred on it, τ'i = θi − θ̄ (Conv1D weights; every other tensor is θ̄).

    Args:
        scaling_factor: λ (the original's ``prior``; 2.0, CART's 8-task setting); 0 gives the simple average.
        rank_ratio: ρ in (0, 1] (``initial_rank_ratio``): each centred task vector keeps max(1, int(ρ·k)) of
            its k singular triplets (0.12: 92 of 768 on GPT-2 small).
    """

    display_name = "CART"
    symbols = {"scaling_factor": "λ", "rank_ratio": "ρ"}
    recommended = {"scaling_factor": 2.0, "rank_ratio": 0.12}
    search = {"rank_ratio": [0.04, 0.08, 0.12, 0.16, 0.24, 0.32]}

    def __init__(self, pool: ModelPool, scaling_factor: float = 2.0, rank_ratio: float = 0.12):
        super().__init__(pool)
        self.scaling_factor, self.rank_ratio = _check_arguments(scaling_factor, rank_ratio)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        return ("cart_parts", self.rank_ratio)  # θ̄ and Σ lowrank(τ'i) depend on the pool and ρ, not on λ

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        average, correction = self.reused(key, lambda: cart_parts_tensor(key, theta0, thetas, self.rank_ratio))
        return average + self.scaling_factor * correction
