"""SVC (Singular Value Calibration): rescale each singular direction of a merge by how much the tasks
over-count it. A wrapper: ``base:`` is the merge it calibrates (Task Arithmetic, TIES, ...).

"When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging", ICML 2026,
https://arxiv.org/abs/2602.05536; follows FusionBench 0.2.33 (``method/singular_value_calibration``).
Per 2-D tensor, θ* = θ0 + U diag(γ ⊙ S) Vᵀ from θ_base − θ0 = U diag(S) Vᵀ. Details: docs/methods.md.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor

from mergelit.errors import check_choice, check_number
from mergelit.gpt2 import is_conv1d_weight
from mergelit.methods.base import MergeMethod, WrapperMethod, method_config
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned

PROJECTION_SIDES = ("input", "output")


def calibrate(theta0: Tensor, thetas: Iterable[Tensor], merged: Tensor, alpha: float) -> Tensor:
    """SVC of one 2-D tensor, θ0 + U diag(γ ⊙ S) Vᵀ in float64, cast back; ``thetas`` (K) read one at a time."""
    base = theta0.to(torch.float64)
    delta = merged.to(torch.float64, copy=True).sub_(base)  # in place on fresh copies: fewer float64 temporaries
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    directions = U.transpose(0, 1).contiguous()  # [R, m]
    merged_response = directions @ delta  # a_r^m, [R, n]
    del delta
    coefficients = []
    for theta in thetas:
        response = directions @ theta.to(torch.float64, copy=True).sub_(base)  # a_r^i, [R, n]
        squared = (response * response).sum(dim=-1).clamp_min(1e-12)
        coefficients.append((merged_response * response).sum(dim=-1) / squared)
    coefficients = torch.nan_to_num(torch.stack(coefficients, dim=1), nan=alpha, neginf=alpha)  # s, [R, K]
    gamma = coefficients.shape[1] / torch.maximum(coefficients, torch.as_tensor(alpha, dtype=torch.float64)).sum(dim=1)
    calibrated = ((U * (gamma * S).unsqueeze(0)) @ Vh).add_(base)
    return calibrated.to(merged.dtype)


def svc_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], merged: dict[str, Tensor],
    alpha: float = 0.1, projection_side: Literal["input", "output"] = "input",
) -> dict[str, Tensor]:
    """SVC of the base's ``merged`` body over whole state dicts as FusionBench: K task matrices stacked, ``einsum``."""
    check_finetuned(pretrained, finetuned)
    out = {}
    for key, theta0 in pretrained.items():
        if merged[key].dim() != 2:
            out[key] = merged[key]
            continue
        transpose = projection_side == "output" and is_conv1d_weight(key)
        flip = (lambda t: t.T) if transpose else (lambda t: t)
        base = flip(theta0).to(torch.float64)
        tasks = torch.stack([flip(body[key]).to(torch.float64) - base for body in finetuned.values()])  # [K, m, n]
        delta = flip(merged[key]).to(torch.float64) - base
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        directions = U.transpose(0, 1).contiguous()
        merged_response = directions @ delta
        responses = torch.einsum("rm,kmn->rkn", directions, tasks)
        squared = (responses * responses).sum(dim=-1).clamp_min(1e-12)
        coefficients = torch.einsum("rn,rkn->rk", merged_response, responses) / squared
        coefficients = torch.nan_to_num(coefficients, nan=alpha, neginf=alpha)
        gamma = tasks.shape[0] / torch.maximum(coefficients, torch.as_tensor(alpha, dtype=torch.float64)).sum(dim=1)
        calibrated = ((U * (gamma * S).unsqueeze(0)) @ Vh + base).to(merged[key].dtype)
        out[key] = flip(calibrated).contiguous()
    return out


class SingularValueCalibration(WrapperMethod):
    """SVC: the base merge with each 2-D tensor's singular values rescaled by γ_r = K / Σi max(s_r^i, α).

    Args:
        alpha: α, the floor of each task's projection coefficient, γ ≤ 1/α (FusionBench's 0.1 around TA and
            TIES; 0.2 around Iso-CTS, 1.0 around TSV-M and WUDI).
        projection_side: ``input`` (FusionBench: Conv1D as stored) or ``output`` (Conv1D transposed first).
        base: the merge to calibrate, a method config ``{class_path: ..., init_args: {...}}`` built on this
            pool (``--model.init_args.base.init_args.scaling_factor 0.5``).
    """

    display_name = "SVC"
    symbols = {"alpha": "α", "projection_side": "side", "base": "base"}
    recommended = {"alpha": 0.1}

    def __init__(
        self, pool: ModelPool, alpha: float = 0.1, projection_side: Literal["input", "output"] = "input",
        base: Callable[[ModelPool], MergeMethod] = {
            "class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.3}
        },
    ):
        super().__init__(pool, base, "SVC")
        self.alpha = check_number(alpha, "alpha (α)", 0, low_open=True)
        self.projection_side = check_choice(projection_side, "projection_side", PROJECTION_SIDES)
        self.save_hyperparameters(ignore=["pool", "base"])
        self.hparams["base"] = method_config(self.base)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        # The base's λ-free parts (Σ τi, TIES's τm) go through its own `reused`, so a sweep keeps them. The
        # calibration keeps nothing: the pool keeps one method's parts at a time, so each would evict the other.
        merged = self.base.merge_tensor(key, theta0, thetas)
        if merged.dim() != 2:
            return merged
        if self.projection_side == "output" and is_conv1d_weight(key):  # Conv1D as [out, in], then back
            return calibrate(theta0.T, (theta.T for theta in thetas), merged.T, self.alpha).T.contiguous()
        return calibrate(theta0, thetas, merged, self.alpha)
