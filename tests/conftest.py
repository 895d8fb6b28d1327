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
