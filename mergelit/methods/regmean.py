"""RegMean: merge each linear layer by the closed-form least-squares fit to every model's outputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849.

Statistics (``mergelit.statistics.gram_statistics``): for every Conv1D of each fine-tuned body
(per block attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; 48 in GPT-2), the Gram matrix of its
input over ``num_regmean_examples`` shuffled train examples: Gi = XiᵀXi / T.

Merge: scale the off-diagonal entries, G̃i = Gi ⊙ (r·11ᵀ + (1−r)I), r = ``reduce_non_diagonal_ratio``,
then W* = (Σ G̃i)⁻¹ Σ G̃i Wi, which minimises Σ ‖Xi W − Xi Wi‖² when r = 1. GPT-2's Conv1D stores
W as [in, out] (y = xW + b), so there is no transpose. Every other tensor (biases, embeddings,
layer norms) is the plain mean of the fine-tuned bodies; tensors matched by
``exclude_param_names_regex`` keep the pretrained value θ0 (FusionBench loads the merged tensors
into the pretrained model), Conv1D weights included.

Numerics: the system is solved with ``torch.linalg.solve`` in float64 (FusionBench forms the
float32 inverse). With padding counted the summed Grams are poorly conditioned, so the two differ
by ~1e-4 in the merged weights; the solve is the more accurate.

Padding (``count_padding``): ``true`` pads every example to ``max_length`` (512) and counts every
position, padding included, as FusionBench does (~96-98 % of positions are padding on GLUE): the
reproduction setting and the default. ``false`` counts only real tokens (attention mask), the
principled variant. The two give different Grams, merged weights and accuracies.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from mergelit.errors import MergeFailed
from mergelit.methods.base import MergeMethod
from mergelit.methods.simple_average import simple_average_merge
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, matching_keys
from mergelit.statistics import DEFAULT_CACHE_DIR, gram_statistics


MAX_CONDITION_NUMBER = 1e12
"""The largest condition number (λmax/λmin of the float64 summed Gram) RegMean solves with.

A float64 solve loses about log10(κ) of its ~16 digits: at 1e12 the merged weights keep ~4
correct digits, more than their float32 storage needs. Measured: ~4e3 on the tiny test pool with
r = 0.6, ≈3e18 (weights up to 1.8e3, finite garbage) on a nearly singular sum. Above the bound
the merge is refused, naming the layer (a singular sum, λmin <= 0, is refused as before)."""


def gram_condition_number(gram: Tensor) -> float:
    """κ = λmax / λmin of a symmetric PSD matrix (float64 eigenvalues); inf when λmin <= 0."""
    eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64))
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if not smallest > 0 or not math.isfinite(largest):
        return math.inf
    return largest / smallest


def _check_ratio(reduce_non_diagonal_ratio: float) -> float:
    if not 0 <= reduce_non_diagonal_ratio <= 1:
        raise ValueError(f"reduce_non_diagonal_ratio (r) must be in [0, 1], got {reduce_non_diagonal_ratio}.")
    return float(reduce_non_diagonal_ratio)


def reduce_non_diagonal(gram: Tensor, reduce_non_diagonal_ratio: float) -> Tensor:
    """G̃ = G ⊙ (r·11ᵀ + (1−r)I): off-diagonal entries times r, the diagonal unchanged."""
    r = reduce_non_diagonal_ratio
    return gram * r + torch.diag_embed(gram.diagonal() * (1 - r))


def regmean_merge(
    finetuned: dict[str, dict[str, Tensor]],
    grams: dict[str, dict[str, Tensor]],
    reduce_non_diagonal_ratio: float = 0.6,
    pretrained: dict[str, Tensor] | None = None,
    exclude_param_names_regex: list[str] = [],
) -> dict[str, Tensor]:
    """W* = (Σ G̃i)⁻¹ Σ G̃i Wi for each ``<module>.weight`` with Grams, the plain mean elsewhere.

    Args:
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        grams: task -> {Conv1D module name (``h.0.mlp.c_fc``) -> Gi, [in, in]}; same modules for every task.
        reduce_non_diagonal_ratio: r, the factor on the Grams' off-diagonal entries.
        pretrained: θ0; needed only when tensors are excluded (they keep θ0).
        exclude_param_names_regex: tensors whose name one of these matches (``re.match``) keep θ0.
    """
    r = _check_ratio(reduce_non_diagonal_ratio)
    if not finetuned:
        raise ValueError("No fine-tuned bodies to merge: give at least one task.")
    if set(grams) != set(finetuned):
        raise ValueError(f"Gram statistics for tasks {sorted(grams)} but bodies for {sorted(finetuned)}.")
    tasks = list(finetuned)
    excluded = matching_keys(next(iter(finetuned.values())), exclude_param_names_regex)
    if excluded and pretrained is None:
        raise ValueError(
            f"Excluded tensors keep the pretrained value: pass `pretrained` (excluded: {sorted(excluded)[:3]}...)."
        )
    if pretrained is not None:
        check_finetuned(pretrained, finetuned)

    merged = simple_average_merge(finetuned)  # every tensor without a Gram: the plain mean
    modules = list(grams[tasks[0]])
    for task in tasks[1:]:
        if set(grams[task]) != set(modules):
            raise ValueError(f"The Grams of {task!r} cover other modules than those of {tasks[0]!r}.")
    for module in modules:
        key = f"{module}.weight"
        if key not in merged:
            raise KeyError(f"A Gram matrix is given for {module!r} but the bodies have no tensor {key!r}.")
        if key in excluded:
            continue
        weight_dim = finetuned[tasks[0]][key].shape[0]
        for task in tasks:
            if grams[task][module].shape != (weight_dim, weight_dim):
                raise ValueError(
                    f"The Gram of {module!r} for {task!r} is {tuple(grams[task][module].shape)}; "
                    f"its weight {key!r} has {weight_dim} inputs."
                )
        scaled = [reduce_non_diagonal(grams[task][module].to(torch.float64), r) for task in tasks]
        summed_gram = sum(scaled)
        # Conv1D: W is [in, out] and y = xW + b, so G̃ W needs no transpose.
        summed_product = sum(gram @ finetuned[task][key].to(torch.float64) for gram, task in zip(scaled, tasks))
        condition = gram_condition_number(summed_gram)
        if math.isfinite(condition) and condition > MAX_CONDITION_NUMBER:
            raise MergeFailed(
                f"RegMean: the summed Gram matrix of {module!r} ({weight_dim}x{weight_dim}) is ill-conditioned "
                f"(condition number {condition:.1e} > {MAX_CONDITION_NUMBER:.0e}): the solve for {key!r} would be "
                f"finite garbage. Use reduce_non_diagonal_ratio < 1, more examples (num_regmean_examples), or "
                f"count_padding: false."
            )
        try:
            solution = torch.linalg.solve(summed_gram, summed_product) if math.isfinite(condition) else None
        except torch.linalg.LinAlgError:
            solution = None
        if solution is None or not torch.isfinite(solution).all():
            raise ValueError(
                f"RegMean: the summed Gram matrix of {module!r} ({weight_dim}x{weight_dim}) is singular, so {key!r} "
                f"has no unique merge. An input feature is zero on every counted position, or fewer positions were "
                f"counted than it has inputs; use more examples, or reduce_non_diagonal_ratio < 1."
            )
        merged[key] = solution.to(merged[key].dtype)
    for key in excluded:
        merged[key] = pretrained[key].clone()
    return merged


class RegMean(MergeMethod):
    """RegMean: each Conv1D weight W* = (Σ G̃i)⁻¹ Σ G̃i Wi from its input Grams; other tensors averaged.

    The Grams Gi of each Conv1D's inputs come from each task's train examples. The statistics
    run as ``trainer.predict`` loops before testing (``prepare``), with a progress bar per task,
    and are cached under ``cache_dir``: a second run with the same models, data and sampling
    arguments loads them (the log says so).

    Args:
        num_regmean_examples: train examples per task for the Gram matrices (FusionBench: 256).
        batch_size: examples per batch of the statistics loop (does not change the Grams).
        reduce_non_diagonal_ratio: r in G̃ = G ⊙ (r·11ᵀ + (1−r)I): the Grams' off-diagonal
            entries are multiplied by r (1 = exact least squares, 0 = diagonal only).
        count_padding: ``true`` pads examples to ``max_length`` (512) and counts padding positions
            in the Grams, as FusionBench does (reproduces its numbers); ``false`` counts real
            tokens only (principled, but gives different numbers).
        exclude_param_names_regex: regular expressions (``re.match`` on body tensor names such as
            ``h.0.mlp.c_fc.weight``); matching tensors keep the pretrained value.
        seed: seed of the draw of the train examples (their indices are stored with the statistics).
        cache_dir: folder of the statistics cache.
    """

    display_name = "RegMean"
    symbols = {"reduce_non_diagonal_ratio": "r"}
    data = "train inputs"

    def __init__(
        self,
        pool: ModelPool,
        num_regmean_examples: int = 256,
        batch_size: int = 32,
        reduce_non_diagonal_ratio: float = 0.6,
        count_padding: bool = True,
        exclude_param_names_regex: list[str] = [],
        seed: int = 42,
        cache_dir: str = DEFAULT_CACHE_DIR,
    ):
        super().__init__(pool)
        if num_regmean_examples < 1:
            raise ValueError(f"num_regmean_examples must be >= 1, got {num_regmean_examples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        matching_keys([], exclude_param_names_regex)  # fail now on a pattern that does not compile
        self.num_regmean_examples = num_regmean_examples
        self.batch_size = batch_size
        self.reduce_non_diagonal_ratio = _check_ratio(reduce_non_diagonal_ratio)
        self.count_padding = count_padding
        self.exclude_param_names_regex = list(exclude_param_names_regex)
        self.seed = seed
        self.cache_dir = cache_dir
        self.grams: dict[str, dict[str, Tensor]] | None = None
        self.save_hyperparameters(ignore=["pool"])

    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.grams = gram_statistics(
            trainer,
            datamodule,
            self.pool,
            num_examples=self.num_regmean_examples,
            batch_size=self.batch_size,
            seed=self.seed,
            count_padding=self.count_padding,
            cache_dir=self.cache_dir,
        )

    def merge(self) -> dict[str, Tensor]:
        if self.grams is None:
            raise RuntimeError(
                "RegMean has no Gram statistics: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        return regmean_merge(
            self.pool.finetuned_bodies(),
            self.grams,
            reduce_non_diagonal_ratio=self.reduce_non_diagonal_ratio,
            pretrained=self.pool.pretrained_body(),
            exclude_param_names_regex=self.exclude_param_names_regex,
        )
