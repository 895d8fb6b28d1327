"""Shared test fixtures: a tiny offline pool and synthetic GLUE data (mergelit.synthetic)."""

from __future__ import annotations

import os

# The hub and W&B are unreachable here; set before transformers/datasets/wandb are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from mergelit.synthetic import write_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``pool/`` (2-layer, 64-wide GPT-2s), ``glue/`` and ``config.yaml``.

    Written once per test session (a few seconds); treat it as read-only.
    """
    root = tmp_path_factory.mktemp("fixtures")
    write_fixtures(root, seed=0)
    return root


@pytest.fixture(scope="session")
def fixtures_config(fixtures_root: Path) -> dict[str, Any]:
    """The LightningCLI fragment ``fixtures_root/config.yaml``, parsed."""
    return yaml.safe_load((fixtures_root / "config.yaml").read_text())


@pytest.fixture(scope="session")
def pool_paths(fixtures_config: dict[str, Any]) -> dict[str, Any]:
    """``{"pretrained": path, "finetuned": {task: path}, "tokenizer": path}`` as write_pool returns."""
    return fixtures_config["pool"]


@pytest.fixture(scope="session")
def glue_path(fixtures_config: dict[str, Any]) -> Path:
    """The synthetic GLUE folder: one ``save_to_disk`` DatasetDict per task."""
    return Path(fixtures_config["data"]["path"])


# ---- real pools from given tensors (no stub pools: every test merges through ModelPool) ----------


def tiny_gpt2_config(vocab_size: int = 13, n_positions: int = 7, n_embd: int = 4, n_layer: int = 1, n_head: int = 2):
    """A GPT-2 config small enough for hand-sized tensors (pad = bos = eos = the last token)."""
    from transformers import GPT2Config

    last = vocab_size - 1
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      bos_token_id=last, eos_token_id=last, pad_token_id=last)


def body_shapes(config) -> dict[str, tuple[int, ...]]:
    """``GPT2Model(config).state_dict()``'s keys and shapes, in order (nothing allocated)."""
    import torch
    from transformers import GPT2Model

    with torch.device("meta"):
        model = GPT2Model(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def write_state_pool(root: Path, config, pretrained: dict, finetuned: dict[str, dict], seed: int = 0) -> dict[str, Any]:
    """Write a real pool holding the given bodies (``GPT2Model`` state dicts) as safetensors + config.json,
    without building a model: fast enough for property tests. Heads are seeded random. Returns the
    ``ModelPool`` arguments."""
    import torch
    from safetensors.torch import save_file

    from mergelit.tasks import GLUE_TASKS

    root = Path(root)
    (root / "pretrained").mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(root / "pretrained" / "config.json"))
    save_file({k: v.contiguous() for k, v in pretrained.items()}, str(root / "pretrained" / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for task, body in finetuned.items():
        names = GLUE_TASKS[task].label_names
        task_config = type(config).from_dict({
            **config.to_dict(), "num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}, "architectures": ["GPT2ForSequenceClassification"],
        })
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        task_config.to_json_file(str(folder / "config.json"))
        state = {f"transformer.{k}": v.contiguous() for k, v in body.items()}
        state["score.weight"] = torch.randn(len(names), config.n_embd, generator=generator)
        save_file(state, str(folder / "model.safetensors"))
        paths[task] = str(folder)
    return {"pretrained": str(root / "pretrained"), "finetuned": paths}


def write_integer_pool(root: Path, seed: int, tasks=("cola", "mrpc", "rte", "sst2"), levels: int = 3) -> dict[str, Any]:
    """A tiny pool whose weights are small integers / 4 and whose task vectors are 0 on about half the
    entries: many ties at TIES's trim cut, many zeros, exact cancellations (float32 sums are exact)."""
    import torch

    config = tiny_gpt2_config()
    generator = torch.Generator().manual_seed(seed)
    shapes = body_shapes(config)
    pretrained = {k: torch.randint(-levels, levels + 1, s, generator=generator) / 4 for k, s in shapes.items()}
    finetuned = {}
    for task in tasks:
        finetuned[task] = {
            k: v + (torch.randint(-levels, levels + 1, v.shape, generator=generator) / 4) * (torch.rand(v.shape, generator=generator) < 0.5)
            for k, v in pretrained.items()
        }
    return write_state_pool(root, config, pretrained, finetuned, seed)
