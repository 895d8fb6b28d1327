"""Fisher Merging: a per-entry average of the fine-tuned bodies weighted by their Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
https://arxiv.org/abs/2111.09832.

Statistics (``mergelit.statistics.fisher_statistics``, in ``prepare``): for each task model, its diagonal
Fisher Fi over ``num_fisher_examples`` shuffled train examples in batches of ``batch_size``,
each batch contributing (∂S/∂θ)², S = Σ_batch Σ_class √p · log_softmax(logits), p = softmax
(detached); Fi = sum / number of examples. The batch size changes Fi (the gradient of a batch
*sum* is squared), which is why it is an argument.

Merge, per tensor (``merge_tensor``), with ε = ``minimal_fisher_weight``:

    θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε),   ci = (1/n) · ni,
    ni = (1/(‖Fi‖ + ε)) / Σj (1/(‖Fj‖ + ε)),

‖Fi‖ the global L2 norm of model i's raw Fisher over every merged tensor (excluded tensors do
not count, as in FusionBench). With ``normalize_fisher_weight: false``, ci = 1/n, the same for
every model, so it cancels: θ* = Σ (Fi + ε) θi / Σ (Fi + ε). Tensors matched by
``exclude_param_names_regex`` keep the pretrained value θ0 (FusionBench loads the merged tensors
into the pretrained model).

Streaming: the norms ‖Fi‖ are one pass over the stored statistics before the merge
(``prepare_merge``); then each key reads θi[key] and Fi[key] one task at a time from the
memory-mapped checkpoints and statistics files, so the merge's memory does not grow with n.
``fisher_merge`` (whole state dicts) is the same computation, kept as the tests' oracle.

Differences from FusionBench (which draws the examples without a seed): the examples are drawn
with ``seed`` and their indices stored with the statistics; a ``num_fisher_examples`` that is not
a multiple of ``batch_size`` uses exactly that many examples (FusionBench fills the last batch).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import lightning as L
import torch
from torch import Tensor

from mergelit.errors import MergeFailed, check_choice, check_integer, check_number
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, matching_keys
from mergelit.statistics import DEFAULT_CACHE_DIR, StoredStatistics, fisher_statistics


def fisher_coefficients(norms: Sequence[float] | None, minimal_fisher_weight: float, n: int) -> list[float]:
    """ci = (1/n) · ni, ni = (1/(‖Fi‖ + ε)) / Σj (1/(‖Fj‖ + ε)); ``norms`` None: ci = 1/n (no normalisation)."""
    if norms is None:
        return [1.0 / n] * n
    inverse = [1.0 / (norm + minimal_fisher_weight) for norm in norms]
    return [(x / sum(inverse)) / n for x in inverse]


def fisher_merge_tensor(
    thetas: Iterable[Tensor], fishers: Iterable[Tensor], coefficients: Sequence[float], minimal_fisher_weight: float
) -> Tensor:
    """θ*[key] = Σ ci (Fi + ε) θi / Σ ci (Fi + ε) for one tensor, accumulated in task order, one
    (θi, Fi) pair at a time."""
    numerator = denominator = None
    for c, theta, fisher in zip(coefficients, thetas, fishers, strict=True):
        if numerator is None:
            numerator, denominator = torch.zeros_like(theta), torch.zeros_like(theta)
        weight = (fisher + minimal_fisher_weight).mul_(c)  # c * (Fi + ε), the same bits
        denominator += weight
        numerator += weight.mul_(theta)  # (c (Fi + ε)) θi, the same bits, in place
        del theta, fisher, weight  # before the next pair is read: one (θi, Fi) in memory at a time
    return numerator.div_(denominator)


def check_fisher(task: str, fishers: Iterable[tuple[str, Tensor]]) -> float:
    """‖Fi‖, the L2 norm of all of model ``task``'s Fisher entries as one vector (float64 per tensor,
    summed in key order), refusing an estimate that is zero everywhere or not finite."""
    squares, nonzero = 0.0, False
    for key, fisher in fishers:
        if not bool(torch.isfinite(fisher).all()):
            raise MergeFailed(f"Fisher Merging: the Fisher estimate of the {task!r} model has NaN/inf in {key!r}.")
        nonzero = nonzero or bool(fisher.any())
        squares += torch.linalg.vector_norm(fisher, dtype=torch.float64).item() ** 2
    if not nonzero:
        # An all-zero estimate (no gradient reached the body: e.g. a zero head) would give that
        # model the weight of ε alone everywhere and, normalised, the largest weight of all.
        raise MergeFailed(
            f"Fisher Merging: the Fisher estimate of the {task!r} model is zero everywhere (no gradient reached "
            f"its body: check its head, or use more/other examples); refusing to merge with it."
        )
    return math.sqrt(squares)


def fisher_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    fishers: dict[str, dict[str, Tensor]],
    minimal_fisher_weight: float = 1e-6,
    normalize_fisher_weight: bool = True,
    exclude_param_names_regex: list[str] = [],
) -> dict[str, Tensor]:
    """θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε) per tensor; excluded tensors keep θ0 (whole state dicts:
    the oracle of ``FisherMerging``'s per-key merge).

    Args:
        pretrained: θ0, the pretrained body's state dict (keys, and the value of excluded tensors).
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        fishers: task -> Fi, the diagonal Fisher of each body (same keys and shapes).
        minimal_fisher_weight: ε, added to every Fisher entry (and to the norms).
        normalize_fisher_weight: weigh model i by ni ∝ 1/(‖Fi‖ + ε) (else every model alike).
        exclude_param_names_regex: tensors whose name one of these matches (``re.match``) keep θ0.
    """
    check_finetuned(pretrained, finetuned)
    if set(fishers) != set(finetuned):
        raise ValueError(f"Fisher statistics for tasks {sorted(fishers)} but bodies for {sorted(finetuned)}.")
    check_finetuned(pretrained, fishers)
    tasks = list(finetuned)
    excluded = matching_keys(pretrained, exclude_param_names_regex)
    merged_keys = [key for key in pretrained if key not in excluded]
    # ‖Fi‖: L2 norm over all of model i's merged Fisher entries (raw, before ε).
    norms = [check_fisher(task, ((key, fishers[task][key]) for key in merged_keys)) for task in tasks] if merged_keys else []
    coefficients = fisher_coefficients(norms if normalize_fisher_weight else None, minimal_fisher_weight, len(tasks))
    return {
        key: pretrained[key].clone() if key in excluded else fisher_merge_tensor(
            [finetuned[task][key] for task in tasks], [fishers[task][key] for task in tasks], coefficients, minimal_fisher_weight
        )
        for key in pretrained
    }


class FisherMerging(MergeMethod):
    """Fisher Merging: per-entry mean of the fine-tuned bodies weighted by their diagonal Fisher.

    Each task's Fisher is estimated on its train split (labels unused). The statistics run as
    ``trainer.predict`` loops before testing (``prepare``), with a progress bar per task, and are
    cached under ``cache_dir``: a second run with the same models, data and sampling arguments
    loads them (the log says so, and the report's costs show what computing them took).
    ``prepare`` leaves them in ``statistics`` (a ``StoredStatistics``: the merge reads each task's
    Fisher of one tensor at a time from its cache file).

    Args:
        num_fisher_examples: train examples per task used to estimate the Fisher (FusionBench: 256).
        batch_size: examples per batch of the estimate. It changes the result: each batch adds
            the square of the gradient of its sum (FusionBench: 32).
        minimal_fisher_weight: ε, added to every Fisher entry and norm, so that entries no model
            saw still get a weight.
        normalize_fisher_weight: weigh model i by ni ∝ 1/(‖Fi‖ + ε), ‖Fi‖ its global Fisher norm
            (FusionBench's default); ``false`` weighs every model alike.
        exclude_param_names_regex: regular expressions (``re.match`` on body tensor names such as
            ``h.0.attn.c_attn.weight``); matching tensors keep the pretrained value.
        seed: seed of the draw of the train examples (their indices are stored with the statistics).
        cache_dir: folder of the statistics cache.
    """

    display_name = "Fisher Merging"
    quick = {"num_fisher_examples": 32}
    data = "train inputs"

    def __init__(
        self,
        pool: ModelPool,
        num_fisher_examples: int = 256,
        batch_size: int = 32,
        minimal_fisher_weight: float = 1e-6,
        normalize_fisher_weight: bool = True,
        exclude_param_names_regex: list[str] = [],
        seed: int = 42,
        cache_dir: str = DEFAULT_CACHE_DIR,
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
            trainer,
            datamodule,
            self.pool,
            num_examples=self.num_fisher_examples,
            batch_size=self.batch_size,
            seed=self.seed,
            cache_dir=self.cache_dir,
        )

    def prepare_merge(self) -> None:
        """Check every task's Fisher and compute the coefficients ci from the norms ‖Fi‖ (one pass
        over the stored statistics, one tensor at a time)."""
        statistics = self.statistics
        if statistics is None:
            raise RuntimeError(
                "FisherMerging has no Fisher statistics: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        keys = self.pool.keys()
        for task in self.tasks:
            if task not in statistics.tasks or set(statistics.names(task)) != set(keys):
                raise ValueError(f"The Fisher statistics of {task!r} do not cover the pool's body tensors; run `prepare` again.")
        self._excluded = matching_keys(keys, self.exclude_param_names_regex)
        merged_keys = [key for key in keys if key not in self._excluded]
        norms = [
            check_fisher(task, ((key, statistics.tensor(task, key)) for key in merged_keys)) for task in self.tasks
        ] if merged_keys else []
        normalize = norms if self.normalize_fisher_weight else None
        self._coefficients = fisher_coefficients(normalize, self.minimal_fisher_weight, len(self.tasks))

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        if key in self._excluded:
            return theta0
        fishers = (self.statistics.tensor(task, key) for task in self.tasks)
        return fisher_merge_tensor(thetas, fishers, self._coefficients, self.minimal_fisher_weight)
