"""CART: Centred Arithmetic with Rank-reduced Task vectors.

Choi, Kim, Lee & Hong 2024, "Revisiting Weight Averaging for Model Merging",
https://arxiv.org/abs/2412.12153 (code: JH-GEECS/CART).

Weight averaging is task arithmetic centred on the average: with τi = θi − θ0 and n tasks,
per tensor,

1. average: θ̄ = θ0 + (1/n) Σi τi;
2. centre: τ'i = τi + θ0 − θ̄ (= θi − θ̄ up to rounding);
3. reduce rank: on the Conv1D weights, lowrank(τ'i) = Ur diag(sr) Vrᵀ, the top r singular
   triplets of τ'i with r = max(1, int(ρ·k)), k = min(rows, cols) (GPT-2 small, ρ = 0.12:
   r = 92 of 768); every other tensor keeps τ'i in full;
4. θ* = θ̄ + λ Σi lowrank(τ'i).

On the tensors kept in full (wte, wpe, LayerNorm, biases) Σi τ'i = 0 in exact arithmetic, so
there θ* is the simple average θ̄ for any λ (up to λ times the rounding residue); with ρ = 1
the whole body is. The low-rank keys follow CART's rule: "attn" or "mlp" in the key and
neither "ln" nor "bias", which on GPT-2 is exactly the 48 Conv1D weights (and excludes the
embeddings). A truncated SVD is transpose-equivariant, so the Conv1D [in, out] storage does
not matter; a task vector of rank below r is no problem either (its missing components are 0).

Defaults: FusionBench has no CART. The original ships configs for 8, 14 and 20 vision tasks
(λ = ``prior``, ρ = ``initial_rank_ratio``: 2.0 / 0.12, 1.5 / 0.16, 1.9 / 0.32) and none
for NLP or 7 tasks; mergelit uses the 8-task setting, λ = 2.0 and ρ = 0.12. The original's
``energy_threshold`` rank rule is not offered.

Cost (``benchmarks/svd_method_cost.py``): n thin SVDs per Conv1D weight, none of the
embeddings. In a λ sweep the pool keeps θ̄ and Σ lowrank(τ'i) (two bodies) so that the other
points only rescale.

The maths is per key: ``CART.merge_tensor`` gets θ0[key] and the θi[key] (read from the
checkpoints when asked for) and reads each τi = θi − θ0 twice (θ̄ first, then the centred
vectors; ``mergelit.linalg.TaskVectors``), so a merge holds about one task vector at a time.
``cart_merge`` (whole bodies) is the reference the per-key merge is tested against.
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
    """CART's key rule: ("attn" or "mlp" in key) and not ("ln" or "bias" in key); a matrix.

    On a GPT-2 body that is exactly the 48 Conv1D weights. (The original tests only the name;
    the 2-D check guards an SVD of anything else.)
    """
    by_name = ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)
    return by_name and tensor.dim() == 2


def cart_rank(k: int, rank_ratio: float) -> int:
    """r = max(1, int(ρ·k)): the number of singular triplets each centred task vector keeps."""
    return max(1, int(rank_ratio * k))


def cart_components(
    pretrained: Tensor, task_vectors: Sequence[Tensor], rank_ratio: float, reduce_rank: bool
) -> tuple[Tensor, Tensor]:
    """(θ̄, Σi lowrank(τ'i)) for one tensor: the parts of θ* = θ̄ + λ Σi lowrank(τ'i) free of λ.

    Args:
        pretrained: θ0 for this tensor.
        task_vectors: τ1..τn for this tensor (not modified).
        rank_ratio: ρ; each centred task vector keeps its top max(1, int(ρ·k)) singular triplets.
        reduce_rank: whether to reduce the rank (``cart_low_rank_applies``); if not, τ'i is kept in full.
    """
    n = len(task_vectors)
    # 1. Average: θ̄ = θ0 + (1/n) Σ τi (as the original: from the task vectors, not the mean of θi).
    average = pretrained + ordered_sum(task_vectors) / n
    rank = cart_rank(min(pretrained.shape), rank_ratio) if reduce_rank else None
    correction = torch.zeros_like(pretrained)
    for tau in task_vectors:  # a second pass: TaskVectors reads τi again
        # 2. Centre: τ'i = τi + θ0 − θ̄.
        centred = tau + pretrained - average
        # 3. Reduce rank (Conv1D weights only).
        correction += low_rank(centred, rank) if reduce_rank else centred
        del tau, centred
    return average, correction


def cart_parts_tensor(key: str, theta0: Tensor, thetas: Sequence[Tensor], rank_ratio: float = 0.12) -> tuple[Tensor, Tensor]:
    """(θ̄, Σi lowrank(τ'i)) of one key, low rank where ``cart_low_rank_applies(key, ...)``: what a λ sweep reuses."""
    # τi = θi − θ0, computed when read (twice here): about one task vector in memory at a time.
    return cart_components(theta0, TaskVectors(theta0, thetas), rank_ratio, cart_low_rank_applies(key, theta0))


def cart_parts(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], rank_ratio: float = 0.12
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(θ̄, Σi lowrank(τ'i)) for every key of whole bodies."""
    check_finetuned(pretrained, finetuned)
    averages, corrections = {}, {}
    for key, base in pretrained.items():
        averages[key], corrections[key] = cart_parts_tensor(key, base, [body[key] for body in finetuned.values()], rank_ratio)
    return averages, corrections


def cart_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 2.0,
    rank_ratio: float = 0.12,
) -> dict[str, Tensor]:
    """θ* = θ̄ + λ Σi lowrank(τ'i), θ̄ = θ0 + (1/n) Σ τi, τ'i = τi + θ0 − θ̄, over whole bodies (the
    reference ``CART``'s per-key merge is tested against).

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        scaling_factor: λ.
        rank_ratio: ρ in (0, 1].
    """
    scaling_factor, rank_ratio = _check_arguments(scaling_factor, rank_ratio)
    averages, corrections = cart_parts(pretrained, finetuned, rank_ratio)
    # 4. θ* = θ̄ + λ Σ lowrank(τ'i).
    return {key: average + scaling_factor * corrections[key] for key, average in averages.items()}


def _check_arguments(scaling_factor: float, rank_ratio: float) -> tuple[float, float]:
    """(λ, ρ) as floats, or a short error naming the bad one."""
    rank_ratio = check_number(
        rank_ratio,
        "rank_ratio (ρ: each centred task vector keeps max(1, int(ρ·k)) of its k singular triplets; 1 gives the simple average)",
        0,
        1,
        low_open=True,
    )
    return check_number(scaling_factor, "scaling_factor (λ)"), rank_ratio


class CART(MergeMethod):
    """CART: θ* = θ̄ + λ Σi lowrank(τ'i), the simple average θ̄ plus the low-rank parts of the task
    vectors centred on it, τ'i = θi − θ̄ (Conv1D weights; every other tensor is θ̄).

    Args:
        scaling_factor: λ (the original's ``prior``), multiplies the summed low-rank centred
            task vectors. 0, like ``rank_ratio`` 1, gives the simple average. Default 2.0: CART's
            8-task setting (no 7-task or NLP setting is published).
        rank_ratio: ρ in (0, 1] (the original's ``initial_rank_ratio``): each centred task vector
            keeps its top max(1, int(ρ·k)) singular triplets, k = min(rows, cols); 0.12 keeps
            92 of 768 on GPT-2 small (CART's 8-task setting).
    """

    display_name = "CART"
    symbols = {"scaling_factor": "λ", "rank_ratio": "ρ"}
    recommended = {"scaling_factor": 2.0, "rank_ratio": 0.12}
    search = {"rank_ratio": [0.04, 0.08, 0.12, 0.16, 0.24, 0.32]}
    kind = "merged"

    def __init__(self, pool: ModelPool, scaling_factor: float = 2.0, rank_ratio: float = 0.12):
        super().__init__(pool)
        self.scaling_factor, self.rank_ratio = _check_arguments(scaling_factor, rank_ratio)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # θ̄ and Σ lowrank(τ'i) depend on the pool and ρ, not on λ: a λ sweep computes them once.
        return ("cart_parts", self.rank_ratio)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        average, correction = self.reused(key, lambda: cart_parts_tensor(key, theta0, thetas, self.rank_ratio))
        # 4. θ* = θ̄ + λ Σ lowrank(τ'i).
        return average + self.scaling_factor * correction
