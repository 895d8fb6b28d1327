"""``mergelit check``: the input checks of ``mergelit test`` without merging or scoring, and a summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mergelit.check import forward_flops, percentile
from mergelit.methods.base import MergeMethod

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check(*args: str):
    from mergelit.__main__ import main

    main(["check", *args])


def test_check_passes_on_the_fixtures_and_prints_the_summary(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    merged = []
    monkeypatch.setattr(MergeMethod, "merge", lambda self: merged.append(1))
    check("-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "ties_merging.yaml"))
    out = capsys.readouterr().out
    assert "is usable" in out and "| pretrained |" in out and "F32" in out
    assert "| cola | validation | 61 |" in out and "| mnli | validation_mismatched | 61 |" in out
    assert "TFLOP" in out and not merged  # nothing merged, nothing scored


def test_check_of_a_data_driven_method_counts_its_examples(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    check("-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "fisher_merging.yaml"))
    out = capsys.readouterr().out
    assert "| sst2 | train | 96 |" in out and "num_fisher_examples = 256" in out


def test_check_fails_on_a_bad_pool_before_reading_data(fixtures_root, tmp_path, monkeypatch, capsys):
    from mergelit.glue import GLUEDataModule

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "rte"
    shutil.copytree(Path(fixtures_root) / "pool" / "rte", folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    read = []
    monkeypatch.setattr(GLUEDataModule, "raw", lambda self, *a: read.append(a))
    with pytest.raises(SystemExit) as exit_info:
        check("-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
              "--pool.finetuned.rte", str(folder))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mergelit: error:") and "safetensors" in err and "'rte'" in err and "Traceback" not in err
    assert not read  # no data row was read


def test_flop_count_by_hand():
    from transformers import GPT2Config

    config = GPT2Config(n_embd=4, n_layer=2, n_head=2)
    # per token: 2 · 2 layers · (4·12 + 4·4 + 2·4·16) = 4 · 192 = 768; attention: 4 · 2 layers · 4 wide · (Σ L² / 2 = 25).
    assert forward_flops(config, tokens=10, squared_lengths=50) == 768 * 10 + 32 * 25
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([1, 2, 3, 4], 95) == 4
