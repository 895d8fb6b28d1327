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

Streaming. The draws are model-major but the merge goes key by key, so one pass over the pool
first (for DARE-TIES, the pass that finds each τ̃i's trim cut) draws every mask in FusionBench's
order and records the generator's state before each (model, tensor) draw (``DareDraws``); the
merge of a key restores those states and draws τ̃i[key] again, the same bits. Beside the merged
body a merge holds a few tensors of one key and the recorded states (5 KB per dropped tensor and
model); DARE-TIES adds one flat body for the trim cuts and the elected signs (int8, a quarter
body), as TIES-Merging. The price is time: the masks are drawn twice (DARE-TA) or three times
(DARE-TIES) instead of once. On a 2-layer, 256-wide pool (56 MB a body, ``wte`` 88 % of it) the
peak RSS above the merge's start was 259 MB at N = 2 and 260 MB at N = 7 for DARE-TA, 459 and
460 MB for DARE-TIES (the whole-body functions: 389 → 733 MB and 509 → 1075 MB), with glibc's
mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the RSS.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Sequence

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
    # torch.rand_like(τ), drawn from `generator`: τ's dtype and strides, so the draws fill τ's storage
    # in order (for GPT-2's Conv1D weights, the stored [in, out] layout) exactly as FusionBench's.
    keep = torch.empty_like(tau).uniform_(0, 1, generator=generator) > sparsity_ratio
    dropped = tau * keep
    del keep
    # A division, as FusionBench: for p = 0.9, x / 0.1 and x * 10 differ in the last bit. In place
    # on our own product: the same bits as `dropped / (1 - p)`, one tensor fewer.
    return dropped.div_(1 - sparsity_ratio) if rescale else dropped


def _is_dropped(key: str, only_conv1d_weights: bool) -> bool:
    return not only_conv1d_weights or is_conv1d_weight(key)


# ---- whole bodies: the reference the per-key merges are tested against ---------------------------
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
    scaling_factor, _, _ = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
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
    themselves (as FusionBench, not of θ0 + τ̃i, which would round differently), each flattened over
    the whole body (keys sorted by name): the part of DARE-TIES that does not depend on λ."""
    threshold = _check_threshold(threshold)
    merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
    # One τ̃i at a time: the generator draws it when TIES trims it (the draw order stays model, then tensor).
    sparse = dare_task_vectors(pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights)
    trimmed_vectors = [trim(flatten(tau), threshold) for tau in sparse]
    return unflatten(disjoint_merge(trimmed_vectors, elect_sign(trimmed_vectors), merge_func), pretrained)


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
        threshold: share of each τ̃i's entries TIES' global trim keeps (by magnitude, whole body):
            a percentage (20 = 20 %), or as FusionBench a fraction <= 1 (0.2 = 20 %).
        merge_func: TIES' disjoint merge: ``sum``, ``mean`` or ``max``.
    """
    scaling_factor, _, _ = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
    merged_tau = dare_ties_task_vector(
        pretrained, finetuned, sparsity_ratio, rescale, seed, only_conv1d_weights, threshold, merge_func
    )
    return add_scaled(pretrained, merged_tau, scaling_factor)


# ---- key by key over a pool: FusionBench's draws replayed ----------------------------------------
class DareDraws:
    """The masks of a pool drawn in FusionBench's order (model-major), replayable key by key.

    ``record`` makes the model-major pass: one generator seeded with ``seed``, for each task in
    pool order and each key in state-dict order, the generator's state is saved, then that τ's
    draws are made (and discarded, or handed to ``visit``). ``dropped(index, key, tau)`` then
    restores the state saved for (task ``index``, ``key``) and draws τ̃i[key] again: the bits of
    the whole-body ``dare_task_vectors``.
    """

    def __init__(self, pool: ModelPool, sparsity_ratio: float, rescale: bool, seed: int, only_conv1d_weights: bool):
        self.pool = pool
        self.sparsity_ratio, self.rescale, self.seed = sparsity_ratio, rescale, seed
        self.only_conv1d_weights = only_conv1d_weights
        self.states: dict[str, list[Tensor]] = {}  # key -> generator state before each task's draws
        self._generator = torch.Generator("cpu")

    def is_dropped(self, key: str) -> bool:
        return _is_dropped(key, self.only_conv1d_weights)

    def record(self, visit: Callable[[int, str, Tensor], None] | None = None) -> None:
        """The model-major pass: save the state before each (task, key) draw, then draw.

        ``visit(index, key, tau)`` (optional) receives each τ̃i[key] in that order (τi itself for a
        key that is not dropped); without it nothing is read and the draws are discarded.
        """
        pool, keys = self.pool, self.pool.keys()
        generator = torch.Generator("cpu").manual_seed(self.seed)
        shapes = self.pool.body_shapes()
        self.states = {key: [] for key in keys if self.is_dropped(key)}
        scratch = None if visit is not None else torch.empty(max(math.prod(shapes[key]) for key in keys))
        for index, task in enumerate(pool.tasks):
            for key in keys:
                dropped = self.is_dropped(key)
                if dropped:
                    self.states[key].append(generator.get_state())
                if visit is not None:
                    tau = pool.finetuned_tensor(task, key) - pool.pretrained_tensor(key)
                    visit(index, key, drop_and_rescale(tau, self.sparsity_ratio, self.rescale, generator) if dropped else tau)
                    del tau  # not held while the next one is read
                elif dropped:
                    # The same number of uniform draws as rand_like(τ) (one per entry, in order).
                    scratch[: math.prod(shapes[key])].uniform_(0, 1, generator=generator)

    def dropped(self, index: int, key: str, tau: Tensor) -> Tensor:
        """τ̃i[key] of task ``index`` from τi[key] = ``tau``, drawn again from the saved state (``tau``
        itself where nothing is dropped)."""
        if not self.is_dropped(key):
            return tau
        self._generator.set_state(self.states[key][index])
        return drop_and_rescale(tau, self.sparsity_ratio, self.rescale, self._generator)

    def all_dropped(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Iterator[Tensor]:
        """τ̃1[key] … τ̃n[key], one at a time (each θi read when its turn comes, and not kept)."""
        for index in range(len(thetas)):
            yield self.dropped(index, key, thetas[index] - theta0)

    def forget(self, key: str) -> None:
        """Drop the states saved for ``key`` (merged: they are not needed again)."""
        self.states.pop(key, None)


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
    search = {"scaling_factor": LAMBDAS}
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
        self.scaling_factor, self.sparsity_ratio, self.seed = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        self.rescale = bool(rescale)
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self._draws: DareDraws | None = None
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # Σ τ̃i depends on the masks' arguments, not on λ: a λ sweep draws them once.
        return ("dare_task_vector_sum", self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)

    def prepare_merge(self) -> None:
        # The draws are recorded on the first key that needs them (none when a sweep reuses every Σ τ̃i).
        self._draws = None

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        summed = self.reused(key, lambda: self._dropped_sum(key, theta0, thetas))
        return theta0 + self.scaling_factor * summed

    def _dropped_sum(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        """Σi τ̃i[key], summed in pool order (FusionBench's ``state_dict_sum``)."""
        if self._draws is None or (self._draws.is_dropped(key) and key not in self._draws.states):
            # First use in this merge (or the key asked for again after its states were dropped).
            self._draws = DareDraws(self.pool, self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)
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
        sparsity_ratio: p ∈ [0, 1], the drop probability of each task-vector entry (default 0.5).
            1 is refused with ``rescale`` (0 / 0).
        rescale: divide the surviving entries by 1 − p before TIES (default true).
        seed: seeds the dedicated CPU generator of the masks, drawn in FusionBench's order (default 0).
        only_conv1d_weights: drop only the 48 Conv1D weights; what FusionBench's
            ``only_on_linear_weights`` means to do, a silent no-op on GPT-2 (no ``nn.Linear``), where
            it gives plain TIES. Default false (drop everywhere).
        threshold: share of each τ̃i's entries kept by TIES' global trim (default 20): a percentage
            in (1, 100], or as FusionBench a fraction in (0, 1] (0.2 = 20 %). It trims the
            already-sparse τ̃i, so ≈ 20 % of all entries survive at p = 0.5.
        merge_func: TIES' disjoint merge: ``sum`` (FusionBench's default), ``mean`` or ``max``.
    """

    display_name = "DARE + TIES-Merging"
    symbols = {"scaling_factor": "λ", "sparsity_ratio": "p", "threshold": "k"}
    # The paper's protocol takes λ and TIES' settings from the best plain TIES run (GPT-2/GLUE: λ 0.6).
    recommended = {"scaling_factor": 0.6, "sparsity_ratio": 0.5, "threshold": 20}
    search = {"scaling_factor": LAMBDAS}
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
        self.scaling_factor, self.sparsity_ratio, self.seed = _check_arguments(scaling_factor, sparsity_ratio, rescale, seed)
        self.rescale = bool(rescale)
        self.only_conv1d_weights = bool(only_conv1d_weights)
        self.threshold = _check_threshold(threshold)
        self.merge_func = check_choice(merge_func, "merge_func", MERGE_FUNCS)
        if threshold <= 1:
            rank_zero_info(f"DARE + TIES-Merging: threshold {threshold} <= 1 is read as a fraction: the trim keeps {100 * threshold:g} %.")
        self._draws: DareDraws | None = None
        self._election: tuple[list[float], float, dict[str, Tensor]] | None = None
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the masks' and TIES' arguments, not on λ: a λ sweep computes it once. The
        # trim's share, not the threshold as written: 0.2 and 20 are the same merge.
        return (
            "dare_ties_task_vector",
            self.sparsity_ratio,
            self.rescale,
            self.seed,
            self.only_conv1d_weights,
            keep_fraction(self.threshold),
            self.merge_func,
        )

    def prepare_merge(self) -> None:
        # The draws and the election are made on the first key that needs them (none when a sweep
        # reuses every τm[key]).
        self._draws = self._election = None

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        merged = self.reused(key, lambda: self._merged_task_vector(key, theta0, thetas))
        return theta0 + self.scaling_factor * merged

    def _merged_task_vector(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if self._election is None or key not in self._election.signs:
            # The draws' generator states (model-major, FusionBench's order), then TIES's whole-body
            # election on the τ̃i they give, replayed key by key.
            pool = self.pool
            self._draws = draws = DareDraws(pool, self.sparsity_ratio, self.rescale, self.seed, self.only_conv1d_weights)
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
