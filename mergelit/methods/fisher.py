"""Fisher Merging: a per-entry average of the fine-tuned bodies weighted by their Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
https://arxiv.org/abs/2111.09832.

Statistics (``mergelit.statistics.fisher_statistics``): for each task model, its diagonal
Fisher Fi over ``num_fisher_examples`` shuffled train examples in batches of ``batch_size``,
each batch contributing (∂S/∂θ)², S = Σ_batch Σ_class √p · log_softmax(logits), p = softmax
(detached); Fi = sum / number of examples. The batch size changes Fi (the gradient of a batch
*sum* is squared), which is why it is an argument.

Merge, per tensor, with ε = ``minimal_fisher_weight``:

    θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε),   ci = (1/n) · ni,
    ni = (1/(‖Fi‖ + ε)) / Σj (1/(‖Fj‖ + ε)),

‖Fi‖ the global L2 norm of model i's raw Fisher over every merged tensor (excluded tensors do
not count, as in FusionBench). With ``normalize_fisher_weight: false``, ci = 1/n, the same for
every model, so it cancels: θ* = Σ (Fi + ε) θi / Σ (Fi + ε). Tensors matched by
``exclude_param_names_regex`` keep the pretrained value θ0 (FusionBench loads the merged tensors
into the pretrained model).

Differences from FusionBench (which draws the examples without a seed): the examples are drawn
with ``seed`` and their indices stored with the statistics; a ``num_fisher_examples`` that is not
a multiple of ``batch_size`` uses exactly that many examples (FusionBench fills the last batch).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from mergelit.errors import MergeFailed
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, matching_keys
from mergelit.statistics import DEFAULT_CACHE_DIR, fisher_statistics


def _global_norm(tensors: dict[str, Tensor], keys: list[str]) -> float:
    """The L2 norm of all entries of ``tensors[k]`` for k in ``keys``, as one vector (float64)."""
    return math.sqrt(sum(torch.linalg.vector_norm(tensors[k], dtype=torch.float64).item() ** 2 for k in keys))


def fisher_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    fishers: dict[str, dict[str, Tensor]],
    minimal_fisher_weight: float = 1e-6,
    normalize_fisher_weight: bool = True,
    exclude_param_names_regex: list[str] = [],
) -> dict[str, Tensor]:
    """θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε) per tensor; excluded tensors keep θ0.

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
    for task in tasks:
        # An all-zero estimate (no gradient reached the body: e.g. a zero head) would give that
        # model the weight of ε alone everywhere and, normalised, the largest weight of all.
        if merged_keys and all(not bool(fishers[task][key].any()) for key in merged_keys):
            raise MergeFailed(
                f"Fisher Merging: the Fisher estimate of the {task!r} model is zero everywhere (no gradient reached "
                f"its body: check its head, or use more/other examples); refusing to merge with it."
            )
        for key in merged_keys:
            if not bool(torch.isfinite(fishers[task][key]).all()):
                raise MergeFailed(f"Fisher Merging: the Fisher estimate of the {task!r} model has NaN/inf in {key!r}.")

    n = len(tasks)
    if normalize_fisher_weight:
        # ‖Fi‖: L2 norm over all of model i's merged Fisher entries (raw, before ε).
        inverse = [1.0 / (_global_norm(fishers[t], merged_keys) + minimal_fisher_weight) for t in tasks]
        coefficients = [(x / sum(inverse)) / n for x in inverse]  # ci = (1/n) · ni
    else:
        coefficients = [1.0 / n] * n

    merged = {}
    for key in pretrained:
        if key in excluded:
            merged[key] = pretrained[key].clone()
            continue
        numerator = torch.zeros_like(pretrained[key])
        denominator = torch.zeros_like(pretrained[key])
        for c, task in zip(coefficients, tasks):
            weight = c * (fishers[task][key] + minimal_fisher_weight)
            numerator += weight * finetuned[task][key]
            denominator += weight
        merged[key] = numerator / denominator
    return merged


class FisherMerging(MergeMethod):
    """Fisher Merging: per-entry mean of the fine-tuned bodies weighted by their diagonal Fisher.

    Each task's Fisher is estimated on its train split (labels unused). The statistics run as
    ``trainer.predict`` loops before testing (``prepare``), with a progress bar per task, and are
    cached under ``cache_dir``: a second run with the same models, data and sampling arguments
    loads them (the log says so).

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
        if num_fisher_examples < 1:
            raise ValueError(f"num_fisher_examples must be >= 1, got {num_fisher_examples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= minimal_fisher_weight < math.inf:
            raise ValueError(f"minimal_fisher_weight (ε) must be >= 0, got {minimal_fisher_weight}.")
        matching_keys([], exclude_param_names_regex)  # fail now on a pattern that does not compile
        self.num_fisher_examples = num_fisher_examples
        self.batch_size = batch_size
        self.minimal_fisher_weight = minimal_fisher_weight
        self.normalize_fisher_weight = normalize_fisher_weight
        self.exclude_param_names_regex = list(exclude_param_names_regex)
        self.seed = seed
        self.cache_dir = cache_dir
        self.fishers: dict[str, dict[str, Tensor]] | None = None
        self.save_hyperparameters(ignore=["pool"])

    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.fishers = fisher_statistics(
            trainer,
            datamodule,
            self.pool,
            num_examples=self.num_fisher_examples,
            batch_size=self.batch_size,
            seed=self.seed,
            cache_dir=self.cache_dir,
        )

    def merge(self) -> dict[str, Tensor]:
        if self.fishers is None:
            raise RuntimeError(
                "FisherMerging has no Fisher statistics: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        return fisher_merge(
            self.pool.pretrained_body(),
            self.pool.finetuned_bodies(),
            self.fishers,
            minimal_fisher_weight=self.minimal_fisher_weight,
            normalize_fisher_weight=self.normalize_fisher_weight,
            exclude_param_names_regex=self.exclude_param_names_regex,
        )
