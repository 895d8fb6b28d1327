"""DARE (drop and rescale) as preprocessing for Task Arithmetic and TIES-Merging.

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099.

With τi = θi − θ0 and drop rate p (``sparsity_ratio``), every entry of every task vector is
dropped independently with probability p and the survivors are rescaled so E[τ̃i] = τi:

    u ~ U[0, 1),  m = u > p,  τ̃i = (τi ⊙ m) / (1 − p)      (the division only with ``rescale``)

then DARE-TA: θ* = θ0 + λ Σi τ̃i, and DARE-TIES: θ* = θ0 + λ τm(τ̃1, …, τ̃n) with TIES' global
trim (``threshold`` %), sign election and disjoint ``merge_func`` run on the already-sparse,
rescaled τ̃i (at p = 0.5, ≈ 50 % zeros, survivors doubled; ≈ 20 % of all entries survive the trim).

Same numbers as FusionBench (``method/dare``) given the same seed: the draws come, in its order
(model by model in pool order, tensor by tensor in state-dict order, ``rand_like`` over each τ's
storage, i.e. GPT-2's Conv1D weights as stored, [in, out]), from a dedicated CPU generator seeded
with ``seed``, which is what FusionBench's CPU-side DARE draws after ``seed_everything(seed)``
(the same generator state gives FusionBench's masks bit for bit; that nothing else draws between
its seeding and its DARE is likely, not checked end to end). The global RNG is left alone. What differs from FusionBench, and why:

- FusionBench's ``seed`` defaults to unseeded; here it is explicit (default 0), so a config
  reproduces its merge.
- FusionBench's ``only_on_linear_weights: true`` drops only ``nn.Linear`` weights, and GPT-2 has
  none (its attention and MLP are ``transformers`` Conv1D): on a GPT-2 pool the flag silently does
  nothing and the result is plain Task Arithmetic / TIES. ``only_conv1d_weights=True`` does what
  it was meant to do on GPT-2: drop (and draw for) only the 48 Conv1D weights; embeddings,
  LayerNorms and biases keep their full τ.
- p = 1 with ``rescale`` divides 0 by 0 (NaN everywhere) in FusionBench; here it is refused
  (with ``rescale=False``, p = 1 drops everything, as the paper's code, which skips the division).

Numerics: ``u > p`` is strict, so even p = 0 drops an entry whose draw is exactly 0 (probability
2^-24 per entry); the kept fraction of a tensor is Binomial(N, 1 − p), not exactly 1 − p; the
rescale is a division (x / 0.1 and x * 10 round differently), as FusionBench.

Cost at GPT-2 small, 7 tasks (``benchmarks/method_cost.py``, 2 threads, shared host): DARE-TA
≈17 s and ≈2.2 GiB beside the pool (model-major: one τ̃i and the sum at a time); DARE-TIES ≈75 s
and ≈9.3 GiB beside the pool (the 7 τ̃i, then TIES' 7 flat trimmed vectors), as FusionBench.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
from torch import Tensor

from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import (
    MERGE_FUNCS,
    add_scaled,
    check_finetuned,
    check_same_keys_and_shapes,
    disjoint_merge,
    elect_sign,
    flatten,
    trim,
    unflatten,
)


def ties_task_vector_from_task_vectors(task_vectors, threshold: float = 20, merge_func: str = "sum") -> dict[str, Tensor]:
    """τm from given task vectors (DARE's τ̃i), flattened by key name: trim, elect, disjoint merge."""
    reference = None
    trimmed = []
    for index, tau in enumerate(task_vectors, start=1):
        if reference is None:
            reference = {key: torch.empty(value.shape, dtype=value.dtype, device="meta") for key, value in tau.items()}
        else:
            check_same_keys_and_shapes(reference, tau, f"task vector {index}")
        trimmed.append(trim(flatten(tau), threshold))
    if reference is None:
        raise ValueError("No task vectors to merge: give at least one task.")
    return unflatten(disjoint_merge(trimmed, elect_sign(trimmed), merge_func), reference)

MAX_SEED = 2**32 - 1  # the seeds Lightning's seed_everything (FusionBench's `seed:`) accepts


def _check_arguments(scaling_factor: float, sparsity_ratio: float, rescale: bool, seed: int) -> None:
    if not math.isfinite(scaling_factor):
        raise ValueError(f"scaling_factor (λ) must be a finite number, got {scaling_factor}.")
    if not 0 <= sparsity_ratio <= 1:
        raise ValueError(f"sparsity_ratio (the drop rate p) must be in [0, 1], got {sparsity_ratio}.")
    if sparsity_ratio == 1 and rescale:
        raise ValueError(
            "sparsity_ratio 1 with rescale=True divides by 1 - p = 0 (NaN everywhere); "
            "use sparsity_ratio in [0, 1), or rescale=False to drop every entry."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")


def drop_and_rescale(tau: Tensor, sparsity_ratio: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """τ̃ = (τ ⊙ m) / (1 − p), m = u > p, u ~ U[0, 1) drawn from ``generator`` over τ's storage (new tensor)."""
    # torch.rand_like(τ), drawn from `generator`: τ's dtype and strides, so the draws fill τ's storage
    # in order (for GPT-2's Conv1D weights, the stored [in, out] layout) exactly as FusionBench's.
    keep = torch.empty_like(tau).uniform_(0, 1, generator=generator) > sparsity_ratio
    dropped = tau * keep
    # A division, as FusionBench: for p = 0.9, x / 0.1 and x * 10 differ in the last bit.
    return dropped / (1 - sparsity_ratio) if rescale else dropped


def _is_dropped(key: str, only_conv1d_weights: bool) -> bool:
    return not only_conv1d_weights or is_conv1d_weight(key)


def dare_drop_and_rescale(
    task_vector: dict[str, Tensor],
    sparsity_ratio: float,
    rescale: bool,
    generator: torch.Generator,
    only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """Drop and rescale one task vector, tensor by tensor in its (state-dict) order.

    With ``only_conv1d_weights`` only the Conv1D weights are dropped and drawn for; every other
    tensor is returned as is (the same tensor object).
    """
    return {
        key: drop_and_rescale(tau, sparsity_ratio, rescale, generator) if _is_dropped(key, only_conv1d_weights) else tau
        for key, tau in task_vector.items()
    }


def dare_task_vectors(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    only_conv1d_weights: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """τ̃i for each fine-tuned body in pool order, one at a time (new tensors), all drawn from one
    CPU generator seeded once with ``seed``: model-major, FusionBench's draw order.

    The same as ``dare_drop_and_rescale(θi − θ0, ...)`` for each body with one generator, but each
    τ is formed and dropped one tensor at a time, so only τ̃i is held, not τi as well.
    """
    _check_arguments(0.0, sparsity_ratio, rescale, seed)
    check_finetuned(pretrained, finetuned)
    # A dedicated CPU generator: FusionBench's DARE runs on CPU, and a CUDA generator would give other masks.
    generator = torch.Generator("cpu").manual_seed(seed)
    for body in finetuned.values():
        # The body's own (named_parameters = state-dict) order sets the draw order.
        yield {
            key: drop_and_rescale(theta - pretrained[key], sparsity_ratio, rescale, generator)
            if _is_dropped(key, only_conv1d_weights)
            else theta - pretrained[key]
            for key, theta in body.items()
        }


def dare_task_vector_sum(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """Σi τ̃i, summed in pool order (FusionBench's ``state_dict_sum``): the part of DARE-TA that does
    not depend on λ. One τ̃i at a time, so beside the pool only τ̃i and the sum are in memory."""
    summed: dict[str, Tensor] | None = None
    for sparse in dare_task_vectors(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights):
        if summed is None:
            summed = sparse  # new tensors, ours to add to in place
        else:
            for key, tau in summed.items():
                tau += sparse[key]
    return summed


def dare_task_arithmetic_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 0.3,
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """DARE-TA: θ* = θ0 + λ Σi τ̃i.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts (pool order = draw order).
        scaling_factor: λ.
        sparsity_ratio: p, the drop probability of each entry.
        rescale: divide the survivors by 1 − p.
        seed: seeds the CPU generator the masks are drawn from.
        only_conv1d_weights: drop only the 48 Conv1D weights.
    """
    _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
    summed = dare_task_vector_sum(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights)
    # θ0 + λ·S, as FusionBench's θ0 + (S·λ): the same float32 numbers.
    return add_scaled(pretrained, summed, scaling_factor)


def dare_ties_task_vector(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    only_conv1d_weights: bool = False,
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm = TIES(τ̃1, …, τ̃n): trim, elect and disjoint merge of the dropped-and-rescaled task vectors
    themselves (as FusionBench, not of θ0 + τ̃i, which would round differently): the part of
    DARE-TIES that does not depend on λ."""
    # One τ̃i at a time: the generator draws it when TIES trims it (the draw order stays model, then tensor).
    sparse = dare_task_vectors(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights)
    return ties_task_vector_from_task_vectors(sparse, threshold, merge_func)


def dare_ties_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 0.5,
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    only_conv1d_weights: bool = False,
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """DARE-TIES: θ* = θ0 + λ τm, τm TIES' trim / elect / disjoint merge of the τ̃i.

    Args:
        pretrained, finetuned, scaling_factor, sparsity_ratio, rescale, seed, only_conv1d_weights:
            as ``dare_task_arithmetic_merge``.
        threshold: percentage of each τ̃i's entries TIES' global trim keeps (by magnitude, whole body).
        merge_func: TIES' disjoint merge: ``sum``, ``mean`` or ``max``.
    """
    _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
    merged_tau = dare_ties_task_vector(
        pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights, threshold, merge_func
    )
    return add_scaled(pretrained, merged_tau, scaling_factor)


class DareTaskArithmetic(MergeMethod):
    """DARE + Task Arithmetic: θ* = θ0 + λ Σi (τi ⊙ mi) / (1 − p), mi ~ Bernoulli(1 − p) per entry.

    Args:
        scaling_factor: λ, multiplies the sum of the dropped-and-rescaled task vectors (FusionBench's
            default 0.3; rescaling keeps E[τ̃i] = τi, so Task Arithmetic's best λ carries over).
        sparsity_ratio: p ∈ [0, 1], the probability that an entry of a task vector is dropped
            (FusionBench's default 0.5). 1 is refused with ``rescale`` (0 / 0).
        rescale: divide the surviving entries by 1 − p (default true, FusionBench's and the paper's).
        seed: seeds the dedicated CPU generator of the masks, drawn in FusionBench's order; the same
            seed as FusionBench's ``seed:`` gives its masks. Default 0 (FusionBench is unseeded).
        only_conv1d_weights: drop only the 48 Conv1D weights (attention and MLP), keeping the full τ
            of embeddings, LayerNorms and biases. What FusionBench's ``only_on_linear_weights`` means
            to do: that flag tests for ``nn.Linear``, which GPT-2 lacks, so on GPT-2 it is a silent
            no-op (plain Task Arithmetic). Default false, FusionBench's (and the paper's) drop everywhere.
    """

    display_name = "DARE + Task Arithmetic"
    symbols = {"scaling_factor": "λ", "sparsity_ratio": "p"}
    # The paper's protocol takes λ from the best plain Task Arithmetic run (GPT-2/GLUE: 0.5); E[τ̃i] = τi.
    recommended = {"scaling_factor": 0.5, "sparsity_ratio": 0.5}
    kind = "merged"
    data = "none"

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 0.3,
        sparsity_ratio: float = 0.5,
        rescale: bool = True,
        seed: int = 0,
        only_conv1d_weights: bool = False,
    ):
        super().__init__(pool)
        _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        self.scaling_factor = float(scaling_factor)
        self.sparsity_ratio = float(sparsity_ratio)
        self.rescale = bool(rescale)
        self.seed = seed
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # Σ τ̃i depends on the masks' arguments, not on λ: a λ sweep draws them once.
        return ("dare_task_vector_sum", self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)

    def merge(self) -> dict[str, Tensor]:
        pretrained = self.pool.pretrained_body()
        if self.reusable is None:
            self.reusable = dare_task_vector_sum(
                pretrained,
                self.pool.finetuned_bodies(),
                self.sparsity_ratio,
                self.rescale,
                self.seed,
                self.only_conv1d_weights,
            )
        return add_scaled(pretrained, self.reusable, self.scaling_factor)


class DareTiesMerging(MergeMethod):
    """DARE + TIES-Merging: θ* = θ0 + λ τm, τm the TIES merge of the dropped-and-rescaled task vectors.

    Args:
        scaling_factor: λ, multiplies the merged task vector τm (FusionBench's default 0.5).
        sparsity_ratio: p ∈ [0, 1], the drop probability of each task-vector entry (default 0.5).
            1 is refused with ``rescale`` (0 / 0).
        rescale: divide the surviving entries by 1 − p before TIES (default true).
        seed: seeds the dedicated CPU generator of the masks, drawn in FusionBench's order (default 0).
        only_conv1d_weights: drop only the 48 Conv1D weights; what FusionBench's
            ``only_on_linear_weights`` means to do, a silent no-op on GPT-2 (no ``nn.Linear``), where
            it gives plain TIES. Default false (drop everywhere).
        threshold: percentage (0, 100] of each τ̃i's entries kept by TIES' global trim (default 20).
            It trims the already-sparse τ̃i, so ≈ 20 % of all entries survive at p = 0.5.
        merge_func: TIES' disjoint merge: ``sum`` (FusionBench's default), ``mean`` or ``max``.
    """

    display_name = "DARE + TIES-Merging"
    symbols = {"scaling_factor": "λ", "sparsity_ratio": "p", "threshold": "k"}
    # The paper's protocol takes λ and TIES' settings from the best plain TIES run (GPT-2/GLUE: λ 0.6).
    recommended = {"scaling_factor": 0.6, "sparsity_ratio": 0.5, "threshold": 20}
    kind = "merged"
    data = "none"

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 0.5,
        sparsity_ratio: float = 0.5,
        rescale: bool = True,
        seed: int = 0,
        only_conv1d_weights: bool = False,
        threshold: float = 20,
        merge_func: Literal["sum", "mean", "max"] = "sum",
    ):
        super().__init__(pool)
        _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        if not 0 < threshold <= 100:
            raise ValueError(
                f"threshold is the percentage of entries TIES keeps and must be in (0, 100], got {threshold}."
            )
        if merge_func not in MERGE_FUNCS:
            raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}; got {merge_func!r}.")
        self.scaling_factor = float(scaling_factor)
        self.sparsity_ratio = float(sparsity_ratio)
        self.rescale = bool(rescale)
        self.seed = seed
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self.threshold = threshold
        self.merge_func = merge_func
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the masks' and TIES' arguments, not on λ: a λ sweep computes it once.
        return (
            "dare_ties_task_vector",
            self.sparsity_ratio,
            self.rescale,
            self.seed,
            self.only_conv1d_weights,
            float(self.threshold),
            self.merge_func,
        )

    def merge(self) -> dict[str, Tensor]:
        pretrained = self.pool.pretrained_body()
        if self.reusable is None:
            self.reusable = dare_ties_task_vector(
                pretrained,
                self.pool.finetuned_bodies(),
                self.sparsity_ratio,
                self.rescale,
                self.seed,
                self.only_conv1d_weights,
                self.threshold,
                self.merge_func,
            )
        return add_scaled(pretrained, self.reusable, self.scaling_factor)
