"""DARE (drop and rescale) as preprocessing for Task Arithmetic and TIES-Merging.

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099.

Each entry of τi = θi − θ0 is dropped with probability p and the survivors rescaled, E[τ̃i] = τi:
u ~ U[0, 1), m = u > p, τ̃i = (τi ⊙ m) / (1 − p) (the division only with ``rescale``). DARE-TA:
θ* = θ0 + λ Σi τ̃i; DARE-TIES: θ* = θ0 + λ τm(τ̃1, …, τ̃n), TIES on the already-sparse τ̃i. The draws
are FusionBench's given the same seed: its order (model by model, tensor by tensor, over each τ's
storage) from a dedicated CPU generator; the global RNG is left alone. The merge goes key by key, so
one model-major pass first records the generator's state before each (model, tensor) draw
(``DareDraws``) and a key's merge replays them: the same bits, memory flat in the number of models.
What differs from FusionBench, the numerics and the memory: docs/methods.md, "DARE".
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import MergelitError, check_choice, check_integer, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import LAMBDAS, MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import (
    MERGE_FUNCS,
    add_scaled,
    check_finetuned,
    disjoint_merge,
    elect_sign,
    flatten,
    keep_fraction,
    ties_election,
    trim,
    unflatten,
)

MAX_SEED = 2**32 - 1  # the seeds Lightning's seed_everything (FusionBench's `seed:`) accepts


def _check_arguments(scaling_factor: float, sparsity_ratio: float, rescale: bool, seed: int) -> tuple[float, float, int]:
    """``(λ, p, seed)`` checked; p = 1 with ``rescale`` refused (0 / 0)."""
    scaling_factor = check_number(scaling_factor, "scaling_factor (λ)")
    sparsity_ratio = check_number(sparsity_ratio, "sparsity_ratio (the drop rate p)", 0, 1)
    if sparsity_ratio == 1 and rescale:
        raise MergelitError(
            "sparsity_ratio 1 with rescale=True divides by 1 - p = 0 (NaN everywhere); "
            "use sparsity_ratio in [0, 1), or rescale=False to drop every entry."
        )
    return scaling_factor, sparsity_ratio, check_integer(seed, "seed", 0, MAX_SEED)


def _check_threshold(threshold: float) -> float:
    """TIES's ``threshold``: in (0, 100], a value <= 1 read as a fraction (as FusionBench)."""
    return check_number(threshold, "threshold (the share of each τ̃i TIES keeps: 20 = 20 %, or a fraction <= 1)", 0, 100, low_open=True)


def drop_and_rescale(tau: Tensor, sparsity_ratio: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """τ̃ = (τ ⊙ m) / (1 − p), m = u > p, u ~ U[0, 1) drawn from ``generator`` over τ's storage (new tensor)."""
    # rand_like(τ) from `generator`: τ's strides, so the draws fill the stored layout in FusionBench's order.
    keep = torch.empty_like(tau).uniform_(0, 1, generator=generator) > sparsity_ratio
    dropped = tau * keep
    del keep
    # A division, as FusionBench (for p = 0.9, x / 0.1 and x * 10 differ in the last bit); in place on
    # our own product: the bits of `dropped / (1 - p)`, one tensor fewer.
    return dropped.div_(1 - sparsity_ratio) if rescale else dropped


def _is_dropped(key: str, only_conv1d_weights: bool) -> bool:
    return not only_conv1d_weights or is_conv1d_weight(key)


# ---- whole bodies: the reference the per-key merges are tested against ---------------------------
def dare_drop_and_rescale(
    task_vector: dict[str, Tensor], sparsity_ratio: float, rescale: bool, generator: torch.Generator,
    only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """Drop and rescale one task vector tensor by tensor, in its order; with ``only_conv1d_weights``
    every other tensor is returned as it is (and drawn for not at all)."""
    return {
        key: drop_and_rescale(tau, sparsity_ratio, rescale, generator) if _is_dropped(key, only_conv1d_weights) else tau
        for key, tau in task_vector.items()
    }


def dare_task_vectors(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], sparsity_ratio: float = 0.5,
    rescale: bool = True, seed: int = 0, only_conv1d_weights: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """τ̃i of each fine-tuned body in pool order, one body at a time, all drawn from one CPU generator
    seeded with ``seed`` (model-major, FusionBench's order); each τ formed and dropped one tensor at
    a time, so τi is never held beside τ̃i."""
    _check_arguments(0.0, sparsity_ratio, rescale, seed)
    check_finetuned(pretrained, finetuned)
    # A CPU generator: FusionBench's DARE runs on CPU, and a CUDA generator would give other masks.
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
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], sparsity_ratio: float = 0.5,
    rescale: bool = True, seed: int = 0, only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """Σi τ̃i in pool order (FusionBench's ``state_dict_sum``), one τ̃i at a time: DARE-TA's λ-free part."""
    summed: dict[str, Tensor] | None = None
    for sparse in dare_task_vectors(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights):
        if summed is None:
            summed = sparse  # new tensors, ours to add to in place
            continue
        for key, tau in summed.items():
            tau += sparse[key]
    return summed


def dare_task_arithmetic_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.3,
    sparsity_ratio: float = 0.5, rescale: bool = True, seed: int = 0, only_conv1d_weights: bool = False,
) -> dict[str, Tensor]:
    """DARE-TA: θ* = θ0 + λ Σi τ̃i (arguments as ``DareTaskArithmetic``'s; pool order = draw order)."""
    scaling_factor, _, _ = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
    summed = dare_task_vector_sum(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights)
    # θ0 + λ·S, as FusionBench's θ0 + (S·λ): the same float32 numbers.
    return add_scaled(pretrained, summed, scaling_factor)


def dare_ties_task_vector(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], sparsity_ratio: float = 0.5,
    rescale: bool = True, seed: int = 0, only_conv1d_weights: bool = False, threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm = TIES(τ̃1, …, τ̃n) of the τ̃i themselves (as FusionBench; θ0 + τ̃i would round differently),
    each flattened over the whole body (keys sorted by name): DARE-TIES' λ-free part."""
    threshold = _check_threshold(threshold)
    merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
    # One τ̃i at a time: the generator draws it when TIES trims it (the draw order stays model, then tensor).
    sparse = dare_task_vectors(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights)
    trimmed_vectors = [trim(flatten(tau), threshold) for tau in sparse]
    return unflatten(disjoint_merge(trimmed_vectors, elect_sign(trimmed_vectors), merge_func), pretrained)


def dare_ties_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], scaling_factor: float = 0.5,
    sparsity_ratio: float = 0.5, rescale: bool = True, seed: int = 0, only_conv1d_weights: bool = False,
    threshold: float = 20, merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """DARE-TIES: θ* = θ0 + λ τm, τm TIES' trim / elect / disjoint merge of the τ̃i (arguments as
    ``DareTiesMerging``'s)."""
    scaling_factor, _, _ = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
    merged_tau = dare_ties_task_vector(
        pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights, threshold, merge_func
    )
    return add_scaled(pretrained, merged_tau, scaling_factor)


# ---- key by key over a pool: FusionBench's draws replayed ----------------------------------------
class DareDraws:
    """A pool's masks in FusionBench's (model-major) order, replayable key by key: ``record`` saves the
    generator's state before each (task, key) draw; ``dropped`` restores it and draws τ̃i[key] again,
    the bits of the whole-body ``dare_task_vectors``."""

    def __init__(self, method: DareTaskArithmetic | DareTiesMerging):
        self.pool = method.pool
        self.sparsity_ratio, self.rescale, self.seed = method.sparsity_ratio, method.rescale, method.seed
        self.only_conv1d_weights = method.only_conv1d_weights
        self.states: dict[str, list[Tensor]] = {}  # key -> generator state before each task's draws
        self._generator = torch.Generator("cpu")

    def is_dropped(self, key: str) -> bool:
        return _is_dropped(key, self.only_conv1d_weights)

    def record(self) -> None:
        """The model-major pass: save the state before each (task, key) draw, then draw (and discard)."""
        keys, shapes = self.pool.keys(), self.pool.body_shapes()
        generator = torch.Generator("cpu").manual_seed(self.seed)
        self.states = {key: [] for key in keys if self.is_dropped(key)}
        scratch = torch.empty(max(math.prod(shapes[key]) for key in keys))
        for _ in self.pool.tasks:
            for key, states in self.states.items():
                states.append(generator.get_state())
                # The same number of uniform draws as rand_like(τ) (one per entry, in order).
                scratch[: math.prod(shapes[key])].uniform_(0, 1, generator=generator)

    def dropped(self, index: int, key: str, tau: Tensor) -> Tensor:
        """τ̃i[key] of task ``index`` from ``tau`` = τi[key], drawn again (``tau`` itself if not dropped)."""
        if not self.is_dropped(key):
            return tau
        self._generator.set_state(self.states[key][index])
        return drop_and_rescale(tau, self.sparsity_ratio, self.rescale, self._generator)

    def all_dropped(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Iterator[Tensor]:
        """τ̃1[key] … τ̃n[key], one at a time (each θi read when its turn comes, and not kept)."""
        for index in range(len(thetas)):
            yield self.dropped(index, key, thetas[index] - theta0)

    def forget(self, key: str) -> None:
        """Drop the states saved for ``key`` (merged: not needed again)."""
        self.states.pop(key, None)


class DareTaskArithmetic(MergeMethod):
    """DARE + Task Arithmetic: θ* = θ0 + λ Σi (τi ⊙ mi) / (1 − p), mi ~ Bernoulli(1 − p) per entry.

    Args:
        scaling_factor: λ, multiplies Σi τ̃i (FusionBench's 0.3; E[τ̃i] = τi, so Task Arithmetic's λ carries over).
        sparsity_ratio: p ∈ [0, 1], each task-vector entry's drop probability; 1 is refused with ``rescale``.
        rescale: divide the surviving entries by 1 − p (FusionBench's and the paper's).
        seed: seeds the masks' CPU generator; FusionBench's ``seed:`` s gives its masks (FusionBench is unseeded).
        only_conv1d_weights: drop only the 48 Conv1D weights (embeddings, LayerNorms, biases keep their
            full τ): what FusionBench's ``only_on_linear_weights`` means to do, a silent no-op on GPT-2
            (no ``nn.Linear``). Default false: drop everywhere, as FusionBench and the paper.
    """

    display_name = "DARE + Task Arithmetic"
    symbols = {"scaling_factor": "λ", "sparsity_ratio": "p"}
    # The paper's protocol takes λ from the best plain Task Arithmetic run (GPT-2/GLUE: 0.5); E[τ̃i] = τi.
    recommended = {"scaling_factor": 0.5, "sparsity_ratio": 0.5}
    search = {"scaling_factor": LAMBDAS}

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
        self.scaling_factor, self.sparsity_ratio, self.seed = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        self.rescale = bool(rescale)
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self._draws: DareDraws | None = None
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # Σ τ̃i depends on the masks' arguments, not on λ: a λ sweep draws them once.
        return ("dare_task_vector_sum", self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)

    def prepare_merge(self) -> None:
        self._draws = None  # recorded on the first key that needs them (none when a sweep reuses every Σ τ̃i)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        summed = self.reused(key, lambda: self._dropped_sum(key, theta0, thetas))
        return theta0 + self.scaling_factor * summed

    def _dropped_sum(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        """Σi τ̃i[key], summed in pool order (FusionBench's ``state_dict_sum``)."""
        if self._draws is None or (self._draws.is_dropped(key) and key not in self._draws.states):
            # First use in this merge (or the key asked for again after its states were dropped).
            self._draws = DareDraws(self)
            self._draws.record()
        summed = None
        for tau in self._draws.all_dropped(key, theta0, thetas):
            summed = tau if summed is None else summed.add_(tau)
            del tau  # not held while the next τ̃i is drawn
        self._draws.forget(key)
        return summed


class DareTiesMerging(MergeMethod):
    """DARE + TIES-Merging: θ* = θ0 + λ τm, τm the TIES merge of the dropped-and-rescaled task vectors.

    Args:
        scaling_factor: λ, multiplies the merged task vector τm (FusionBench's default 0.5).
        sparsity_ratio: p ∈ [0, 1], the drop probability of each task-vector entry; 1 is refused with ``rescale``.
        rescale: divide the surviving entries by 1 − p before TIES.
        seed: seeds the masks' CPU generator, drawn in FusionBench's order.
        only_conv1d_weights: drop only the 48 Conv1D weights (FusionBench's ``only_on_linear_weights``
            means to; on GPT-2, no ``nn.Linear``, that flag is a silent no-op giving plain TIES).
        threshold: share of each τ̃i's entries TIES' global trim keeps: a percentage in (1, 100], or as
            FusionBench a fraction in (0, 1] (0.2 = 20 %); on the already-sparse τ̃i (≈ 20 % survive at p = 0.5).
        merge_func: TIES' disjoint merge: ``sum`` (FusionBench's default), ``mean`` or ``max``.
    """

    display_name = "DARE + TIES-Merging"
    symbols = {"scaling_factor": "λ", "sparsity_ratio": "p", "threshold": "k"}
    # The paper's protocol takes λ and TIES' settings from the best plain TIES run (GPT-2/GLUE: λ 0.6).
    recommended = {"scaling_factor": 0.6, "sparsity_ratio": 0.5, "threshold": 20}
    search = {"scaling_factor": LAMBDAS}

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
        self.scaling_factor, self.sparsity_ratio, self.seed = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        self.rescale = bool(rescale)
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self.threshold = _check_threshold(threshold)
        self.merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
        if threshold <= 1:
            rank_zero_info(f"DARE + TIES-Merging: threshold {threshold} <= 1 is read as a fraction: the trim keeps {100 * threshold:g} %.")
        self._draws: DareDraws | None = None
        self._election = None  # TIES's trim cuts and elected signs (``ties_election``)
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the masks' and TIES' arguments, not on λ: a λ sweep computes it once. The
        # trim's share, not the threshold as written: 0.2 and 20 are the same merge.
        masks = (self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)
        return ("dare_ties_task_vector", *masks, keep_fraction(self.threshold), self.merge_func)

    def prepare_merge(self) -> None:
        self._draws = self._election = None  # made on the first key that needs them (none when all are reused)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        merged = self.reused(key, lambda: self._merged_task_vector(key, theta0, thetas))
        return theta0 + self.scaling_factor * merged

    def _merged_task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if self._election is None or key not in self._election.signs:
            # The draws' generator states, then TIES's whole-body election on the τ̃i they give.
            pool = self.pool
            self._draws = draws = DareDraws(self)
            draws.record()
            self._election = ties_election(
                {key: shape.numel() for key, shape in pool.body_shapes().items()},
                len(pool.tasks),
                lambda i, k: draws.dropped(i, k, pool.finetuned_tensor(pool.tasks[i], k) - pool.pretrained_tensor(k)),
                self.threshold,
            )
        election, draws = self._election, self._draws
        sign = election.sign(key)  # Elect: the zeros of s take the majority sign.
        merged = disjoint_merge(election.trimmed(draws.all_dropped(key, theta0, thetas)), sign, self.merge_func)
        draws.forget(key)
        if not election.signs:
            self._draws = self._election = None  # every key merged: free the states and the signs
        return merged
