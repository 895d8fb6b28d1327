"""RegMean: merge each linear layer by the closed-form least-squares fit to every model's outputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849. Each Conv1D weight W* = (Σ G̃i)⁻¹ Σ G̃i Wi, Gi = XiᵀXi / T the Gram
of its inputs on task i's train examples, G̃i = Gi ⊙ (r·11ᵀ + (1−r)I); every other tensor: the mean of
the θi. Solved in float64. Details: docs/methods.md.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import lightning as L
import torch
from torch import Tensor

from mergelit.errors import MergeFailed, check_choice, check_integer, check_number
from mergelit.linalg import ordered_sum
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, matching_keys
from mergelit.statistics import DEFAULT_CACHE_DIR, StoredStatistics, gram_statistics

MAX_CONDITION_NUMBER = 1e12  # of the float64 summed Gram: a solve keeps ~16 − log10(κ) digits (docs/methods.md)


def gram_condition_number(gram: Tensor) -> float:
    """κ = λmax / λmin of a symmetric PSD matrix (float64 eigenvalues); inf when λmin <= 0."""
    eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64))
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if not smallest > 0 or not math.isfinite(largest):
        return math.inf
    return largest / smallest


def reduce_non_diagonal(gram: Tensor, reduce_non_diagonal_ratio: float) -> Tensor:
    """G̃ = G ⊙ (r·11ᵀ + (1−r)I): off-diagonal entries times r, the diagonal unchanged."""
    return gram * reduce_non_diagonal_ratio + torch.diag_embed(gram.diagonal() * (1 - reduce_non_diagonal_ratio))


def regmean_solve(
    module: str, tasks: Sequence[str], grams: Iterable[Tensor], weights: Iterable[Tensor],
    reduce_non_diagonal_ratio: float,
) -> Tensor:
    """W* = (Σ G̃i)⁻¹ Σ G̃i Wi (float64) of Conv1D ``module``, one (Gi, Wi) at a time; refuses a bad or singular sum."""
    summed_gram = summed_product = None
    for task, gram, weight in zip(tasks, grams, weights, strict=True):
        dim = weight.shape[0]
        if gram.shape != (dim, dim):
            raise ValueError(
                f"The Gram of {module!r} for {task!r} is {tuple(gram.shape)}; "
                f"its weight {module + '.weight'!r} has {dim} inputs."
            )
        scaled = reduce_non_diagonal(gram.to(torch.float64), reduce_non_diagonal_ratio)
        if summed_gram is None:
            summed_gram = torch.zeros_like(scaled)
            summed_product = torch.zeros(weight.shape, dtype=torch.float64)
        summed_gram += scaled
        summed_product += scaled @ weight.to(torch.float64)  # Conv1D: W is [in, out], y = xW + b: no transpose
        del gram, weight, scaled  # before the next pair is read
    dim = summed_gram.shape[0]
    condition = gram_condition_number(summed_gram)
    if math.isfinite(condition) and condition > MAX_CONDITION_NUMBER:
        raise MergeFailed(
            f"RegMean: the summed Gram matrix of {module!r} ({dim}x{dim}) is ill-conditioned "
            f"(condition number {condition:.1e} > {MAX_CONDITION_NUMBER:.0e}): the solve for {module + '.weight'!r} "
            f"would be finite garbage. Use reduce_non_diagonal_ratio < 1, more examples (num_regmean_examples), or "
            f"count_padding: false."
        )
    try:
        solution = torch.linalg.solve(summed_gram, summed_product) if math.isfinite(condition) else None
    except torch.linalg.LinAlgError:
        solution = None
    if solution is None or not torch.isfinite(solution).all():
        raise ValueError(
            f"RegMean: the summed Gram matrix of {module!r} ({dim}x{dim}) is singular, so {module + '.weight'!r} "
            f"has no unique merge. An input feature is zero on every counted position, or fewer positions were "
            f"counted than it has inputs; use more examples, or reduce_non_diagonal_ratio < 1."
        )
    return solution


def solved_weights(names: Callable[[str], Iterable[str]], tasks: Sequence[str], keys: Iterable[str]) -> dict:
    """``<module>.weight`` -> module for the modules with Grams (``names(task)``, the same for every task)."""
    modules = list(names(tasks[0]))
    for task in tasks[1:]:
        if set(names(task)) != set(modules):
            raise ValueError(f"The Grams of {task!r} cover other modules than those of {tasks[0]!r}.")
    solved = {f"{module}.weight": module for module in modules}
    for key, module in solved.items():
        if key not in keys:
            raise KeyError(f"A Gram matrix is given for {module!r} but the bodies have no tensor {key!r}.")
    return solved


def regmean_merge(
    finetuned: dict[str, dict[str, Tensor]], grams: dict[str, dict[str, Tensor]],
    reduce_non_diagonal_ratio: float = 0.6, pretrained: dict[str, Tensor] | None = None,
    exclude_param_names_regex: list[str] = [],
) -> dict[str, Tensor]:
    """RegMean over whole state dicts, ``grams`` task -> {Conv1D module -> Gi}; θ0 needed only to exclude."""
    r = check_number(reduce_non_diagonal_ratio, "reduce_non_diagonal_ratio (r)", low=0, high=1)
    if not finetuned:
        raise ValueError("No fine-tuned bodies to merge: give at least one task.")
    if set(grams) != set(finetuned):
        raise ValueError(f"Gram statistics for tasks {sorted(grams)} but bodies for {sorted(finetuned)}.")
    tasks = list(finetuned)
    first = finetuned[tasks[0]]
    check_finetuned(first, finetuned)
    excluded = matching_keys(first, exclude_param_names_regex)
    if excluded and pretrained is None:
        raise ValueError(
            f"Excluded tensors keep the pretrained value: pass `pretrained` (excluded: {sorted(excluded)[:3]}...)."
        )
    if pretrained is not None:
        check_finetuned(pretrained, finetuned)
    solved = solved_weights(lambda task: grams[task], tasks, first)
    merged = {}
    for key in first:
        thetas = [finetuned[task][key] for task in tasks]
        if key in excluded:
            merged[key] = pretrained[key].clone()
        elif key in solved:
            module_grams = [grams[task][solved[key]] for task in tasks]
            merged[key] = regmean_solve(solved[key], tasks, module_grams, thetas, r).to(first[key].dtype)
        else:
            merged[key] = ordered_sum(thetas).div_(len(thetas))
    return merged


class RegMean(MergeMethod):
    """RegMean: each Conv1D weight W* = (Σ G̃i)⁻¹ Σ G̃i Wi from its input Grams (computed and cached by
    ``prepare``); other tensors averaged.

    Args:
        num_regmean_examples: train examples per task for the Gram matrices (FusionBench: 256).
        batch_size: examples per batch of the statistics loop (does not change the Grams).
        reduce_non_diagonal_ratio: r, the factor on the Grams' off-diagonal entries (1: exact least squares).
        count_padding: ``true`` counts padding positions up to ``max_length`` as FusionBench (reproduces its
            numbers); ``false`` counts real tokens only.
        exclude_param_names_regex: regexes ``re.match``-ing body tensor names; matching tensors keep θ0.
        seed: seed of the draw of the train examples (their indices are stored with the statistics).
        cache_dir: folder of the statistics cache.
    """

    display_name = "RegMean"
    symbols = {"reduce_non_diagonal_ratio": "r"}
    quick = {"num_regmean_examples": 32}
    data = "train inputs"

    def __init__(
        self, pool: ModelPool, num_regmean_examples: int = 256, batch_size: int = 32,
        reduce_non_diagonal_ratio: float = 0.6, count_padding: bool = True, exclude_param_names_regex: list[str] = [],
        seed: int = 42, cache_dir: str = DEFAULT_CACHE_DIR,
    ):
        super().__init__(pool)
        self.num_regmean_examples = check_integer(num_regmean_examples, "num_regmean_examples", minimum=1)
        self.batch_size = check_integer(batch_size, "batch_size", minimum=1)
        self.reduce_non_diagonal_ratio = check_number(reduce_non_diagonal_ratio, "reduce_non_diagonal_ratio (r)", 0, 1)
        self.count_padding = check_choice(count_padding, "count_padding", (True, False))
        matching_keys([], exclude_param_names_regex)  # fail now on a pattern that does not compile
        self.exclude_param_names_regex = list(exclude_param_names_regex)
        self.seed = check_integer(seed, "seed", minimum=None)
        self.cache_dir = cache_dir
        self.statistics: StoredStatistics | None = None
        self._excluded: set[str] = set()
        self._solved: dict[str, str] = {}
        self.save_hyperparameters(ignore=["pool"])

    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.statistics = gram_statistics(
            trainer, datamodule, self.pool, num_examples=self.num_regmean_examples, batch_size=self.batch_size,
            seed=self.seed, count_padding=self.count_padding, cache_dir=self.cache_dir,
        )

    def prepare_merge(self) -> None:
        if self.statistics is None:
            raise RuntimeError(
                "RegMean has no Gram statistics: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        self._solved = solved_weights(self.statistics.names, self.tasks, self.pool.keys())
        self._excluded = matching_keys(self.pool.keys(), self.exclude_param_names_regex)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if key in self._excluded:
            return theta0
        module = self._solved.get(key)
        if module is None:
            return ordered_sum(thetas).div_(len(thetas))  # the mean, summed in task order (FusionBench's rounding)
        grams = (self.statistics.tensor(task, module) for task in self.tasks)
        return regmean_solve(module, self.tasks, grams, thetas, self.reduce_non_diagonal_ratio).to(theta0.dtype)
