"""DDP on CPU (2 processes, gloo) gives exactly the 1-process numbers.

Each distributed run is a real `mergelit test` subprocess (Lightning relaunches the command
once per rank). The evaluation sets have 61 rows and the batch size is 7: 61 is not
divisible by 2 x 7, so a sampler that pads the last shard would change the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.tasks import TASKS
from mergelit.statistics import read_statistics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Statistics on the 96 train rows in batches of 20: 5 batches, split 3 / 2 between the ranks.
STATISTICS_ARGS = ["--model.init_args.batch_size", "20"]


def run(fixtures_root: Path, method: str, workdir: Path, devices: int, *extra: str) -> dict:
    """One `mergelit test`: in this process for 1 device, a subprocess (relaunched per rank) for DDP."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        "test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / f"{method}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--data.batch_size", "7", "--report_save_path", str(workdir / "report.json"), *extra,
    ]
    if devices == 1:
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            main(args)
        finally:
            os.chdir(cwd)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "mergelit", *args]
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = list(workdir.glob("lightning_logs/version_*/report.json"))
    assert len(reports) == 1, "exactly one report per run, written by rank 0"
    return json.loads((workdir / "report.json").read_text())


def assert_same_numbers(single: dict, distributed: dict) -> None:
    assert list(single) == list(distributed) and list(single)[: len(TASKS) + 1] == [*TASKS, "average"]
    for task in TASKS:
        assert distributed[task]["accuracy"] == single[task]["accuracy"], task  # counts: exact
        assert distributed[task]["loss"] == pytest.approx(single[task]["loss"], rel=1e-6), task


def statistics_files(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(cache.rglob("*.safetensors"))
    assert files, f"no statistics written under {cache}"
    loaded = {}
    for path in files:
        tensors, metadata = read_statistics(path)
        loaded[str(path.relative_to(cache))] = (tensors, json.loads(metadata["indices"]))
    return loaded


def assert_same_statistics(single: Path, distributed: Path) -> None:
    one, two = statistics_files(single), statistics_files(distributed)
    assert one.keys() == two.keys()  # same cache keys: same models, rows, seed, batch size
    for name, (tensors, indices) in one.items():
        other, other_indices = two[name]
        assert indices == other_indices
        for key, value in tensors.items():
            scale = value.abs().max().clamp(min=1e-30)
            assert ((other[key] - value).abs().max() / scale).item() <= 1e-6, (name, key)


@pytest.mark.parametrize("method", ["task_arithmetic", "simple_ensemble"])
def test_ddp_accuracy_equals_one_process(method, fixtures_root, tmp_path):
    single = run(fixtures_root, method, tmp_path / "one", 1)
    distributed = run(fixtures_root, method, tmp_path / "two", 2)
    assert_same_numbers(single, distributed)


@pytest.mark.parametrize("method", ["regmean", "fisher_merging"])
def test_ddp_statistics_and_accuracy_equal_one_process(method, fixtures_root, tmp_path):
    args = lambda where: [*STATISTICS_ARGS, "--model.init_args.cache_dir", str(tmp_path / where / "cache")]  # noqa: E731
    single = run(fixtures_root, method, tmp_path / "one", 1, *args("one"))
    distributed = run(fixtures_root, method, tmp_path / "two", 2, *args("two"))
    assert_same_statistics(tmp_path / "one" / "cache", tmp_path / "two" / "cache")
    assert_same_numbers(single, distributed)
