"""Subspace Boosting: raise the small singular values of a merged update to the cutoff's, so the merge
does not collapse onto a few directions. A wrapper: ``base:`` is the merge it boosts (TA, TIES, ...).

Skorobogat, Roth, Georgescu, Akata 2025, "Subspace-Boosted Model Merging", https://arxiv.org/abs/2506.16506;
follows FusionBench's unreleased branch ``openclaw_dev-feat/subspace-boosting``. Per target matrix of
θ_base − θ0 = U diag(S) Vᵀ, the values below S[cutoff] are raised to it, the cutoff the first j with
(S_1 + … + S_j) / ΣS ≥ β. Details: docs/methods.md.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mergelit.errors import check_choice, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import MergeMethod, WrapperMethod, method_config
from mergelit.pool import ModelPool

TARGETS = ("conv1d", "fusionbench_branch")
BRANCH_TARGET_KEYS = (  # the branch's default ``target_keys`` (substrings of a key), in its order
    "attn.in_proj_weight", "attn.out_proj.weight", "c_fc.weight", "c_proj.weight", "model.visual.proj",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.out_proj.weight",
    "fc1.weight", "fc2.weight", "q.weight", "k.weight", "v.weight", "o.weight", "wi.weight", "wi_0.weight",
    "wi_1.weight", "wo.weight",
)


def subspace_boost(matrix: Tensor, beta: float) -> tuple[Tensor, int]:
    """(X', cutoff) of one matrix in its dtype: the singular values below S[cutoff] raised to it, the cutoff the
    first j whose cumulative share is ≥ β, else the last index (also when Σσ = 0); ``matrix`` if none is raised."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    ratio = torch.cumsum(S, dim=0) / S.sum()
    reached = (ratio >= beta).nonzero()
    cutoff = int(reached[0]) if len(reached) else S.numel() - 1
    boosted = torch.clamp(S, min=S[cutoff])
    if torch.equal(boosted, S):
        return matrix, cutoff
    return (U * boosted.unsqueeze(0)) @ Vh, cutoff


def boost_plan(key: str, shape: Sequence[int], targets: str, beta: float, attn_beta: float) -> Optional[tuple]:
    """How ``key`` is boosted: (split dim, block size, β), or None if it is no target."""
    if len(shape) != 2:
        return None
    if targets == "conv1d":
        if key.endswith("attn.c_attn.weight"):
            return (1, shape[1] // 3, attn_beta)  # q, k, v: the output axis of Conv1D [in, 3·E]
        return (1, shape[1], beta) if is_conv1d_weight(key) else None
    for target in BRANCH_TARGET_KEYS:
        if target in key:
            if "in_proj" in key or key.endswith(("q.weight", "k.weight", "v.weight")):
                return (0, shape[1], attn_beta)  # nn.Linear in_proj [3·E, E]: q, k, v along dim 0
            return (1, shape[1], beta)
    return None


def boost_tensor(key: str, update: Tensor, plan: tuple[int, int, float]) -> tuple[Tensor, list[int]]:
    """(SB(update), cutoffs) of one key, block by block (a zero one kept, with a warning); ``update`` if unchanged."""
    dim, size, beta = plan
    blocks = torch.split(update, size, dim=dim)
    boosted, cutoffs = [], []
    for index, block in enumerate(blocks):
        if not bool(block.any()):
            name = key if len(blocks) == 1 else f"{key} (block {index} of {len(blocks)})"
            message = f"Subspace Boosting: the update of {name} is zero (no spectrum to boost); it is kept as it is."
            warnings.warn(message, stacklevel=2)
        result, cutoff = subspace_boost(block, beta)
        boosted.append(result)
        cutoffs.append(cutoff)
    if all(result is block for result, block in zip(boosted, blocks)):
        return update, cutoffs
    return torch.cat(boosted, dim=dim), cutoffs


def _boost_key(key: str, theta0: Tensor, merged: Tensor, plan: tuple[int, int, float]) -> tuple[Tensor, list[int]]:
    """(θ0 + SB(merged − θ0), cutoffs) of one target key, in float64; ``merged`` itself when nothing changes."""
    update = merged.to(torch.float64) - theta0.to(torch.float64)
    boosted, cutoffs = boost_tensor(key, update, plan)
    return (merged if boosted is update else theta0 + boosted.to(theta0.dtype)), cutoffs


def subspace_boosting_merge(
    pretrained: dict[str, Tensor], merged: dict[str, Tensor], beta: float = 0.01, attn_beta: Optional[float] = None,
    targets: Literal["conv1d", "fusionbench_branch"] = "conv1d",
) -> dict[str, Tensor]:
    """θ0 + SB(θ_base − θ0) on the target tensors, θ_base (``merged``) elsewhere, over whole state dicts."""
    attn_beta = beta if attn_beta is None else attn_beta
    out = {}
    for key, theta0 in pretrained.items():
        plan = boost_plan(key, theta0.shape, targets, beta, attn_beta)
        out[key] = merged[key] if plan is None else _boost_key(key, theta0, merged[key], plan)[0]
    return out


class SubspaceBoosting(WrapperMethod):
    """Subspace Boosting: the base merge with each target matrix's small singular values raised to
    the β-cutoff's (θ* = θ0 + SB(θ_base − θ0)).

    Args:
        beta: β, the cumulative share of Σσ at which the cutoff is set (the branch's 0.01; 1 changes nothing).
        attn_beta: β of the attention q, k, v blocks (``attn.c_attn``); None: ``beta``.
        targets: ``conv1d`` (the 48 Conv1D weights, c_attn per q/k/v) or ``fusionbench_branch`` (the branch's
            key rule: c_fc, attn.c_proj, mlp.c_proj on GPT-2).
        base: the merge to boost, a method config ``{class_path: ..., init_args: {...}}`` built on this pool
            (``--model.init_args.base.init_args.scaling_factor 0.3``); its λ scales the boosted update.
    """

    display_name = "Subspace Boosting"
    symbols = {"beta": "β", "attn_beta": "β_attn", "targets": "targets", "base": "base"}
    recommended = {"beta": 0.01}

    def __init__(
        self, pool: ModelPool, beta: float = 0.01, attn_beta: Optional[float] = None,
        targets: Literal["conv1d", "fusionbench_branch"] = "conv1d",
        base: Callable[[ModelPool], MergeMethod] = {
            "class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 1.0}
        },
    ):
        super().__init__(pool, base, "Subspace Boosting")
        self.beta = check_number(beta, "beta (β)", 0, 1)
        self.attn_beta = self.beta if attn_beta is None else check_number(attn_beta, "attn_beta (β of q, k, v)", 0, 1)
        self.targets = check_choice(targets, "targets", TARGETS)
        self.cutoffs: dict[str, list[int]] = {}  # target key -> each block's cutoff (0: every σ raised to σ1)
        self.save_hyperparameters(ignore=["pool", "base"])
        self.hparams["base"] = method_config(self.base)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        # The base's λ-free parts (Σ τi, TIES's τm) go through its own `reused`, so a sweep keeps them.
        merged = self.base.merge_tensor(key, theta0, thetas)
        plan = boost_plan(key, theta0.shape, self.targets, self.beta, self.attn_beta)
        if plan is not None:
            merged, self.cutoffs[key] = _boost_key(key, theta0, merged, plan)
        if key == self.pool.keys()[-1] and self.cutoffs:
            cutoffs = [cutoff for values in self.cutoffs.values() for cutoff in values]
            rank_zero_info(
                f"Subspace Boosting: {len(cutoffs)} matrices boosted; {sum(c == 0 for c in cutoffs)} cut at 0 "
                f"(flattened to σ1); cutoffs from {min(cutoffs)} to {max(cutoffs)}."
            )
        return merged
