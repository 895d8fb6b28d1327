"""Export: the merged body with each task's head as plain transformers checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from mergelit.pool import ModelPool


def save_merged(
    folder: str | os.PathLike, pool: ModelPool, body_of: Callable[[str], dict[str, Tensor]]
) -> list[Path]:
    """Write ``folder/<task>/`` for every task of ``pool``: the body ``body_of(task)`` + that task's head
    as a complete ``GPT2ForSequenceClassification`` checkpoint (config, tokenizer, safetensors) that
    ``AutoModelForSequenceClassification.from_pretrained`` loads.

    ``body_of`` gives the same merged body for every task, or (task-aware methods) each task's own.
    """
    from transformers import GPT2ForSequenceClassification

    tokenizer = pool.load_tokenizer()
    written = []
    for task in pool.tasks:
        body_state = {k: v.detach().cpu() for k, v in body_of(task).items()}
        with torch.device("meta"):
            model = GPT2ForSequenceClassification(pool.task_config(task))
        state = {f"transformer.{k}": v.clone() for k, v in body_state.items()}
        state["score.weight"] = pool.head(task).detach().cpu().clone()
        model.load_state_dict(state, strict=True, assign=True)
        out = Path(folder) / task
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        written.append(out)
    return written
