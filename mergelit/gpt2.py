"""GPT-2 building blocks shared by scoring, statistics and adaptation: bodies from state dicts,
classification heads, and the read-out at the last non-pad token."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def last_non_pad_index(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """Index of the rightmost token that is not the pad id, per row (GPT-2's read-out)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def build_body(config, state: dict[str, Tensor], fused_gelu: bool = False) -> nn.Module:
    """A frozen ``GPT2Model`` holding ``state`` (built on the meta device: no random init).

    ``fused_gelu``: PyTorch's fused tanh GELU instead of transformers' ``NewGELUActivation``: faster
    on the CPU, but the logits move in their last bits (benchmarks/README.md), so off by default.
    """
    from transformers import GPT2Model
    with torch.device("meta"):
        body = GPT2Model(config)
    # assign: the body takes the given tensors (a merge's fresh output) without a copy of a whole body.
    body.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    if fused_gelu:
        for block in body.h:
            block.mlp.act = nn.GELU(approximate="tanh")
    return body.eval().requires_grad_(False)


def build_head(weight: Tensor) -> nn.Linear:
    """A frozen classification head (``score``: Linear n_embd -> num_labels, no bias) holding ``weight``."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data.copy_(weight)
    return head.requires_grad_(False)


# GPT-2's Conv1D weights (4 per block), stored [in, out]: y = x W + b.
CONV1D_WEIGHT_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_conv1d_weight(key: str) -> bool:
    """Whether a body tensor name is a Conv1D weight (``h.3.mlp.c_fc.weight``)."""
    return key.endswith(CONV1D_WEIGHT_SUFFIXES)
