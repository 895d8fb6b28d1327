"""Fisher Merging: a per-entry average of the fine-tuned bodies weighted by their Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
https://arxiv.org/abs/2111.09832. θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε) per tensor, Fi the diagonal
Fisher of model i on its train split, ci = (1/n)·ni, ni ∝ 1/(‖Fi‖ + ε). Details: docs/methods.md.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import lightning as L
import torch
from torch import Tensor

from mergelit.errors import MergeFailed, check_choice, check_integer, check_number
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, matching_keys
from mergelit.statistics import DEFAULT_CACHE_DIR, StoredStatistics, fisher_statistics


def fisher_merge_tensor(
    thetas: Iterable[Tensor], fishers: Iterable[Tensor], coefficients: Sequence[float], minimal_fisher_weight: float
) -> Tensor:
    """θ*[key] = Σ ci (Fi + ε) θi / Σ ci (Fi + ε), in task order, one (θi, Fi) pair in memory at a time."""
    numerator = denominator = None
    for c, theta, fisher in zip(coefficients, thetas, fishers, strict=True):
        if numerator is None:
            numerator, denominator = torch.zeros_like(theta), torch.zeros_like(theta)
        weight = (fisher + minimal_fisher_weight).mul_(c)  # c * (Fi + ε), the same bits
        denominator += weight
        numerator += weight.mul_(theta)  # (c (Fi + ε)) θi, the same bits, in place
        del theta, fisher, weight  # before the next pair is read
    return numerator.div_(denominator)


def check_fisher(task: str, fishers: Iterable[tuple[str, Tensor]]) -> float:
    """‖Fi‖ of model ``task``'s (key, Fisher) pairs (float64, in key order); refuses a zero or non-finite one."""
    squares, nonzero = 0.0, False
    for key, fisher in fishers:
        if not bool(torch.isfinite(fisher).all()):
            raise MergeFailed(f"Fisher Merging: the Fisher estimate of the {task!r} model has NaN/inf in {key!r}.")
        nonzero = nonzero or bool(fisher.any())
        squares += torch.linalg.vector_norm(fisher, dtype=torch.float64).item() ** 2
    if not nonzero:
        # No gradient reached the body (e.g. a zero head): ε alone would weigh it, normalised the most of all.
        raise MergeFailed(
            f"Fisher Merging: the Fisher estimate of the {task!r} model is zero everywhere (no gradient reached "
            f"its body: check its head, or use more/other examples); refusing to merge with it."
        )
    return math.sqrt(squares)


def fisher_coefficients(
    tasks: Sequence[str], keys: Sequence[str], fisher: Callable[[str, str], Tensor], normalize: bool, eps: float
) -> list[float]:
    """ci = (1/n)·ni, ni = (1/(‖Fi‖ + ε)) / Σj (1/(‖Fj‖ + ε)) over the merged ``keys`` (not ``normalize``: 1/n)."""
    n = len(tasks)
    norms = [check_fisher(task, ((key, fisher(task, key)) for key in keys)) for task in tasks] if keys else []
    if not normalize:
        return [1.0 / n] * n
    inverse = [1.0 / (norm + eps) for norm in norms]
    return [(x / sum(inverse)) / n for x in inverse]


def fisher_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], fishers: dict[str, dict[str, Tensor]],
    minimal_fisher_weight: float = 1e-6, normalize_fisher_weight: bool = True,
    exclude_param_names_regex: list[str] = [],
) -> dict[str, Tensor]:
    """Fisher Merging over whole state dicts, ``fishers`` task -> Fi (the other arguments as ``FisherMerging``'s)."""
    check_finetuned(pretrained, finetuned)
    if set(fishers) != set(finetuned):
        raise ValueError(f"Fisher statistics for tasks {sorted(fishers)} but bodies for {sorted(finetuned)}.")
    check_finetuned(pretrained, fishers)
    tasks = list(finetuned)
    excluded = matching_keys(pretrained, exclude_param_names_regex)
    keys = [key for key in pretrained if key not in excluded]
    coefficients = fisher_coefficients(
        tasks, keys, lambda task, key: fishers[task][key], normalize_fisher_weight, minimal_fisher_weight
    )
    return {
        key: theta0.clone() if key in excluded else fisher_merge_tensor(
            [finetuned[t][key] for t in tasks], [fishers[t][key] for t in tasks], coefficients, minimal_fisher_weight
        )
        for key, theta0 in pretrained.items()
    }


class FisherMerging(MergeMethod):
    """Fisher Merging: per-entry mean of the fine-tuned bodies weighted by their diagonal Fisher (estimated
    and cached by ``prepare``).

    Args:
        num_fisher_examples: train examples per task used to estimate the Fisher (FusionBench: 256).
        batch_size: examples per batch; each adds the square of its sum's gradient, so it matters (FusionBench: 32).
        minimal_fisher_weight: ε, added to every Fisher entry and norm (entries no model saw still weigh).
        normalize_fisher_weight: weigh model i by ni ∝ 1/(‖Fi‖ + ε) (FusionBench's default), else alike.
        exclude_param_names_regex: regexes ``re.match``-ing body tensor names; matching tensors keep θ0.
        seed: seed of the draw of the train examples (their indices are stored with the statistics).
        cache_dir: folder of the statistics cache.
    """

    display_name = "Fisher Merging"
    quick = {"num_fisher_examples": 32}
    data = "train inputs"

    def __init__(
        self, pool: ModelPool, num_fisher_examples: int = 256, batch_size: int = 32,
        minimal_fisher_weight: float = 1e-6, normalize_fisher_weight: bool = True,
        exclude_param_names_regex: list[str] = [], seed: int = 42, cache_dir: str = DEFAULT_CACHE_DIR,
    ):
        super().__init__(pool)
        self.num_fisher_examples = check_integer(num_fisher_examples, "num_fisher_examples", minimum=1)
        self.batch_size = check_integer(batch_size, "batch_size", minimum=1)
        self.minimal_fisher_weight = check_number(minimal_fisher_weight, "minimal_fisher_weight (ε)", low=0)
        self.normalize_fisher_weight = check_choice(normalize_fisher_weight, "normalize_fisher_weight", (True, False))
        matching_keys([], exclude_param_names_regex)  # fail now on a pattern that does not compile
        self.exclude_param_names_regex = list(exclude_param_names_regex)
        self.seed = check_integer(seed, "seed", minimum=None)
        self.cache_dir = cache_dir
        self.statistics: StoredStatistics | None = None
        self._excluded: set[str] = set()
        self._coefficients: list[float] = []
        self.save_hyperparameters(ignore=["pool"])

    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.statistics = fisher_statistics(
            trainer, datamodule, self.pool, num_examples=self.num_fisher_examples, batch_size=self.batch_size,
            seed=self.seed, cache_dir=self.cache_dir,
        )

    def prepare_merge(self) -> None:
        """Check every task's Fisher and compute the ci from the norms ‖Fi‖ (one pass over the statistics)."""
        statistics = self.statistics
        if statistics is None:
            raise RuntimeError(
                "FisherMerging has no Fisher statistics: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        keys = self.pool.keys()
        for task in self.tasks:
            if task not in statistics.tasks or set(statistics.names(task)) != set(keys):
                raise ValueError(
                    f"The Fisher statistics of {task!r} do not cover the pool's body tensors; run `prepare` again."
                )
        self._excluded = matching_keys(keys, self.exclude_param_names_regex)
        merged_keys = [key for key in keys if key not in self._excluded]
        self._coefficients = fisher_coefficients(
            self.tasks, merged_keys, statistics.tensor, self.normalize_fisher_weight, self.minimal_fisher_weight
        )

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if key in self._excluded:
            return theta0
        fishers = (self.statistics.tensor(task, key) for task in self.tasks)
        return fisher_merge_tensor(thetas, fishers, self._coefficients, self.minimal_fisher_weight)
