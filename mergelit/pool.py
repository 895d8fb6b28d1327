"""ModelPool: the pretrained GPT-2 and one fine-tuned GPT-2 classifier per GLUE task.

Names map to paths (hub ids or local folders, both through ``from_pretrained``). Nothing
is loaded until asked for, so parsing a config or ``--help`` never touches weights. Bodies
are ``GPT2Model`` state dicts; heads are the ``score`` weights of each
``GPT2ForSequenceClassification``. Weights come from safetensors only; no remote code.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from mergelit.glue import GLUE_TASKS, load_tokenizer, ordered_tasks
from mergelit.state_dict import check_same_keys_and_shapes

PAD_TOKEN_ID = 50256  # <|endoftext|>: the spec pads with it, the real `gpt2` config has no pad token


def _check_safetensors(path: str) -> None:
    if path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"Checkpoint folder {path!r} does not exist.")
    # A local folder without safetensors would make from_pretrained fall back to nothing
    # useful (we never unpickle .bin files): say so by name. Hub ids are checked by the hub.
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")):
        raise FileNotFoundError(
            f"Checkpoint folder {path!r} has no *.safetensors file; mergelit loads safetensors only. "
            f"Convert it with `model.save_pretrained(folder, safe_serialization=True)`."
        )


class ModelPool:
    """The models to merge.

    Args:
        pretrained: the pretrained GPT-2 (θ0): hub id (``gpt2``) or folder. A
            ``GPT2LMHeadModel`` or a bare ``GPT2Model`` checkpoint.
        finetuned: task -> hub id or folder of a ``GPT2ForSequenceClassification``
            fine-tuned on that task (``tanganke/gpt2_cola``, ...).
        tokenizer: tokenizer path or hub id; defaults to ``pretrained``.
    """

    def __init__(self, pretrained: str, finetuned: dict[str, str], tokenizer: str | None = None):
        self.tasks = ordered_tasks(list(finetuned))
        self.pretrained_path = pretrained
        self.finetuned_paths = {task: finetuned[task] for task in self.tasks}
        self.tokenizer_path = tokenizer or pretrained
        self._pretrained_body: dict[str, Tensor] | None = None
        self._config = None
        self._finetuned: dict[str, tuple[dict[str, Tensor], Tensor, Any]] = {}
        self._cached: dict[Hashable, Any] = {}

    def __repr__(self) -> str:
        return f"ModelPool(pretrained={self.pretrained_path!r}, tasks={self.tasks})"

    # ---- pretrained -----------------------------------------------------------------------
    def body_config(self):
        """The pretrained GPT-2 config with the spec's pad token (used to build bodies)."""
        if self._config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.pretrained_path)
            if config.model_type != "gpt2":
                raise ValueError(f"{self.pretrained_path!r} is a {config.model_type!r} model; mergelit merges GPT-2.")
            if config.pad_token_id is None:
                config.pad_token_id = PAD_TOKEN_ID
            self._config = config
        return self._config

    def pretrained_body(self) -> dict[str, Tensor]:
        """θ0: the pretrained ``GPT2Model`` state dict (loaded once)."""
        if self._pretrained_body is None:
            from transformers import GPT2Model

            _check_safetensors(self.pretrained_path)
            # GPT2Model.from_pretrained drops the `transformer.` prefix and the LM head of a
            # GPT2LMHeadModel checkpoint (as `gpt2` on the hub is).
            model = GPT2Model.from_pretrained(self.pretrained_path, use_safetensors=True, dtype=torch.float32)
            self._pretrained_body = _detached(model.state_dict())
        return self._pretrained_body

    # ---- fine-tuned -----------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.finetuned_paths:
            raise KeyError(f"Task {task!r} is not in the pool; its tasks are {', '.join(self.tasks)}.")

    def _load(self, task: str) -> tuple[dict[str, Tensor], Tensor, Any]:
        self._check_task(task)
        if task not in self._finetuned:
            from transformers import GPT2ForSequenceClassification

            path = self.finetuned_paths[task]
            _check_safetensors(path)
            model = GPT2ForSequenceClassification.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
            expected = GLUE_TASKS[task].num_labels
            if model.config.num_labels != expected or model.score.weight.shape[0] != expected:
                raise ValueError(
                    f"The {task!r} head in {path!r} has {model.score.weight.shape[0]} labels; "
                    f"GLUE {task} has {expected}. Point `pool.finetuned.{task}` at a {task} classifier."
                )
            body = _detached(model.transformer.state_dict())
            check_same_keys_and_shapes(self.pretrained_body(), body, f"fine-tuned body {task!r} ({path})")
            config = model.config
            if config.pad_token_id is None:
                config.pad_token_id = PAD_TOKEN_ID
            self._finetuned[task] = (body, model.score.weight.detach().clone(), config)
        return self._finetuned[task]

    def finetuned_body(self, task: str) -> dict[str, Tensor]:
        """θ_task: the body of ``task``'s fine-tuned classifier."""
        return self._load(task)[0]

    def finetuned_bodies(self) -> dict[str, dict[str, Tensor]]:
        """Every fine-tuned body, in task order."""
        return {task: self.finetuned_body(task) for task in self.tasks}

    def head(self, task: str) -> Tensor:
        """``task``'s classification head weight, shape [num_labels, n_embd] (no bias)."""
        return self._load(task)[1]

    def task_config(self, task: str):
        """The config of ``task``'s fine-tuned classifier (labels, pad token id)."""
        return self._load(task)[2]

    def check(self) -> None:
        """Load every model once and check labels and shapes (raises on the first problem)."""
        for task in self.tasks:
            self._load(task)

    def load_tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the stored result after that.

        For what several methods or sweep points derive from the same models (Σ τi, the TIES
        merged task vector): a λ sweep then only rescales it. The models never change, so a
        result never goes stale; ``key`` must name everything else it depends on (arguments).
        """
        if key not in self._cached:
            self._cached[key] = compute()
        return self._cached[key]


def _detached(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in state.items()}

