"""Subspace Boosting: raise the small singular values of a merged update to the cutoff's, so the merge
does not collapse onto a few directions. A wrapper: ``base:`` is the merge it boosts (TA, TIES, ...).

Skorobogat, Roth, Georgescu, Akata 2025, "Subspace-Boosted Model Merging",
https://arxiv.org/abs/2506.16506. The paper's code was not available; this follows FusionBench's
unreleased branch ``openclaw_dev-feat/subspace-boosting`` (``subspace_boosting_single_matrix``).

Per matrix X: U, S, Vᵀ = svd(X, thin); r_j = (S_1 + … + S_j) / (S_1 + … + S_k); the cutoff is the first
j with r_j ≥ β (none: the last index); S' = max(S, S[cutoff]) (the tail raised to S[cutoff], the head
kept); X' = U diag(S') Vᵀ.

The branch boosts the merged task vector (Σ τi or TIES's vector) and then applies λ: θ* = θ0 + λ·SB(τ).
SB(cX) = c·SB(X) for c ≠ 0, so that is the boost of the base method's own update θ_base − θ0, which
is what this wrapper does: θ* = θ0 + SB(θ_base − θ0) on the target tensors, θ_base elsewhere.

**Targets** (``targets``).
- ``conv1d`` (default): the paper's ViT targets (every attention and MLP matrix, q, k and v apart)
  mapped onto GPT-2: the 48 Conv1D weights; ``attn.c_attn`` [768, 2304] is split along **dim 1**, its
  output axis (columns 0–767 = q, 768–1535 = k, 1536–2303 = v), each block boosted with ``attn_beta``
  and put back. wte, wpe, LN and biases keep the base's values.
- ``fusionbench_branch``: the branch's own key rule, literally: keys containing ``attn.in_proj_weight``,
  ``attn.out_proj.weight``, ``c_fc.weight``, ``c_proj.weight`` (and CLIP / Llama / T5 names), in_proj
  split along dim 0. On GPT-2 that boosts ``mlp.c_fc``, ``attn.c_proj`` and ``mlp.c_proj`` (36 of the 48
  Conv1D weights) and skips ``attn.c_attn``.

**What β = 0.01 does.** The cutoff is 0 whenever σ1 ≥ 1 % of Σσ (always for k ≤ 100 singular
values): every singular value is raised to σ1, X' = σ1·U Vᵀ, a flat spectrum at the *top* value. At
the branch's λ = 1 that is a large step: β and the base's λ are hyperparameters to select on the dev
split; the defaults are for parity. ``cutoffs[key]`` keeps each matrix's cutoff.

**Numerics.** SVDs in float64 (raising every singular value to σ1 amplifies rounding in the small
singular vectors: float32 and float64 differ by 4e-5 on the tiny pool). A matrix whose spectrum the
boost leaves as it is (no value raised; β = 1 on a full-rank matrix) is returned as it is, without an
SVD round trip. A zero update has no spectrum (0/0 ratios, no cutoff): kept as it is, with a warning
naming the tensor. SB(Xᵀ) = SB(X)ᵀ: the Conv1D layout does not matter once q, k, v are split along
the output axis.

**Base.** Any method that merges one body per key (``kind == "merged"``, with ``merge_tensor``);
refused: the ensemble, task-aware methods, Pretrained and Individual. The base's data-driven step
(``prepare``) runs as the wrapper's.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import MergelitError, check_choice, check_number
from mergelit.methods.base import MergeMethod, WrapperMethod, method_config
from mergelit.pool import ModelPool

TARGETS = ("conv1d", "fusionbench_branch")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""GPT-2's Conv1D weights, stored [in, out]."""
BRANCH_TARGET_KEYS = (
    "attn.in_proj_weight", "attn.out_proj.weight", "c_fc.weight", "c_proj.weight", "model.visual.proj",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.out_proj.weight",
    "fc1.weight", "fc2.weight", "q.weight", "k.weight", "v.weight", "o.weight", "wi.weight", "wi_0.weight",
    "wi_1.weight", "wo.weight",
)
"""The branch's ``subspace_boosting`` default ``target_keys`` (substrings of a key), in its order."""


def boosted_spectrum(S: Tensor, beta: float) -> tuple[Tensor, int]:
    """(S', cutoff): the singular values below S[cutoff] raised to it; cutoff = the first j whose
    cumulative share r_j ≥ β, else the last index (also when Σσ = 0: NaN ratios)."""
    ratio = torch.cumsum(S, dim=0) / S.sum()
    reached = (ratio >= beta).nonzero()
    cutoff = int(reached[0]) if len(reached) else S.numel() - 1
    return torch.clamp(S, min=S[cutoff]), cutoff


def subspace_boost(matrix: Tensor, beta: float) -> tuple[Tensor, int]:
    """(X', cutoff) of one matrix, computed in its dtype; ``matrix`` itself when no value is raised."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    boosted, cutoff = boosted_spectrum(S, beta)
    if torch.equal(boosted, S):
        return matrix, cutoff
    return (U * boosted.unsqueeze(0)) @ Vh, cutoff


def boost_plan(key: str, shape: Sequence[int], targets: str, beta: float, attn_beta: float) -> Optional[tuple[int, int, float]]:
    """How ``key`` is boosted: (split dim, block size, β), or None if it is no target."""
    if len(shape) != 2:
        return None
    if targets == "conv1d":
        if key.endswith("attn.c_attn.weight"):
            return (1, shape[1] // 3, attn_beta)  # q, k, v: the output axis of Conv1D [in, 3·E]
        return (1, shape[1], beta) if key.endswith(CONV1D_WEIGHTS) else None
    for target in BRANCH_TARGET_KEYS:
        if target in key:
            if "in_proj" in key or key.endswith(("q.weight", "k.weight", "v.weight")):
                return (0, shape[1], attn_beta)  # nn.Linear in_proj [3·E, E]: q, k, v along dim 0
            return (1, shape[1], beta)
    return None


def boost_tensor(key: str, update: Tensor, plan: tuple[int, int, float]) -> tuple[Tensor, list[int]]:
    """(SB(update), cutoffs) of one key, block by block along the plan's split; ``update`` itself when
    no block changes. A zero block is kept, with a warning naming the tensor."""
    dim, size, beta = plan
    blocks = torch.split(update, size, dim=dim)
    boosted, cutoffs = [], []
    for index, block in enumerate(blocks):
        name = key if len(blocks) == 1 else f"{key} (block {index} of {len(blocks)})"
        if not bool(block.any()):
            warnings.warn(f"Subspace Boosting: the update of {name} is zero (no spectrum to boost); it is kept as it is.", stacklevel=2)
        result, cutoff = subspace_boost(block, beta)
        boosted.append(result)
        cutoffs.append(cutoff)
    if all(result is block for result, block in zip(boosted, blocks)):
        return update, cutoffs
    return torch.cat(boosted, dim=dim), cutoffs


def subspace_boosting_merge(
    pretrained: dict[str, Tensor],
    merged: dict[str, Tensor],
    beta: float = 0.01,
    attn_beta: Optional[float] = None,
    targets: Literal["conv1d", "fusionbench_branch"] = "conv1d",
) -> dict[str, Tensor]:
    """θ0 + SB(θ_base − θ0) on the target tensors (float64 SVDs), θ_base elsewhere, over whole state
    dicts (the reference the wrapper is tested against). ``merged`` is the base method's body."""
    attn_beta = beta if attn_beta is None else attn_beta
    out = {}
    for key, theta0 in pretrained.items():
        plan = boost_plan(key, theta0.shape, targets, beta, attn_beta)
        if plan is None:
            out[key] = merged[key]
            continue
        update = merged[key].to(torch.float64) - theta0.to(torch.float64)
        boosted, _ = boost_tensor(key, update, plan)
        out[key] = merged[key] if boosted is update else theta0 + boosted.to(theta0.dtype)
    return out


class SubspaceBoosting(WrapperMethod):
    """Subspace Boosting: the base merge with each target matrix's small singular values raised to
    the β-cutoff's (θ* = θ0 + SB(θ_base − θ0)).

    Args:
        beta: β, the cumulative share of Σσ at which the cutoff is set (the branch's 0.01; its comment
            suggests 0.02 for language). 1 leaves a full-rank matrix as it is.
        attn_beta: β of the attention q, k, v blocks (``attn.c_attn``); None: ``beta``.
        targets: ``conv1d`` (the 48 Conv1D weights, c_attn per q/k/v along its output axis) or
            ``fusionbench_branch`` (the branch's key rule: c_fc, attn.c_proj, mlp.c_proj on GPT-2).
        base: the merge to boost, a method config ``{class_path: mergelit.methods.TaskArithmetic,
            init_args: {scaling_factor: 1.0}}`` (built on this pool; override its arguments with
            ``--model.init_args.base.init_args.scaling_factor 0.3``). Its λ scales the boosted update.
    """

    display_name = "Subspace Boosting"
    symbols = {"beta": "β", "attn_beta": "β_attn", "targets": "targets", "base": "base"}
    recommended = {"beta": 0.01}
    data = "none"

    def __init__(
        self,
        pool: ModelPool,
        beta: float = 0.01,
        attn_beta: Optional[float] = None,
        targets: Literal["conv1d", "fusionbench_branch"] = "conv1d",
        base: Callable[[ModelPool], MergeMethod] = {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 1.0}},
    ):
        super().__init__(pool, base, "Subspace Boosting")
        self.beta = check_number(beta, "beta (β)", 0, 1)
        self.attn_beta = self.beta if attn_beta is None else check_number(attn_beta, "attn_beta (β of q, k, v)", 0, 1)
        self.targets = check_choice(targets, "targets", TARGETS)
        self.cutoffs: dict[str, list[int]] = {}
        """target key -> the cutoff of each of its blocks (0: every singular value raised to σ1)."""
        self.save_hyperparameters(ignore=["pool", "base"])
        self.hparams["base"] = method_config(self.base)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        # The base's λ-free parts (Σ τi, TIES's τm) go through its own `reused`, so a sweep keeps them.
        merged = self.base.merge_tensor(key, theta0, thetas)
        plan = boost_plan(key, theta0.shape, self.targets, self.beta, self.attn_beta)
        if plan is not None:
            update = merged.to(torch.float64) - theta0.to(torch.float64)
            boosted, self.cutoffs[key] = boost_tensor(key, update, plan)
            if boosted is not update:
                merged = theta0 + boosted.to(theta0.dtype)
        if key == self.pool.keys()[-1] and self.cutoffs:
            self._log_cutoffs()
        return merged

    def _log_cutoffs(self) -> None:
        cutoffs = [cutoff for values in self.cutoffs.values() for cutoff in values]
        rank_zero_info(
            f"Subspace Boosting: {len(cutoffs)} matrices boosted; {sum(c == 0 for c in cutoffs)} cut at 0 "
            f"(flattened to σ1); cutoffs from {min(cutoffs)} to {max(cutoffs)}."
        )
