"""FusionBench migration: its pool files work as the pool, its report JSON is read by compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergelit import tables
from mergelit.__main__ import main
from mergelit.cli import fusionbench_args
from mergelit.pool import fusionbench_pool_args, from_fusionbench
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fusionbench_pool(pool_paths: dict) -> dict:
    models = [{"name": "_pretrained_", "path": pool_paths["pretrained"]}]
    models += [{"name": task, "path": path} for task, path in pool_paths["finetuned"].items()]
    return {"type": "HF_GPT2ForSequenceClassification", "models": models}


def test_pool_args_from_both_fusionbench_forms():
    listed = {"type": "HF_GPT2ForSequenceClassification", "models": [
        {"name": "_pretrained_", "path": "gpt2"}, {"name": "sst2", "path": "tanganke/gpt2_sst2"},
        {"name": "cola", "path": "./models/cola"}]}
    assert fusionbench_pool_args(listed) == {
        "pretrained": "gpt2", "finetuned": {"cola": "./models/cola", "sst2": "tanganke/gpt2_sst2"}}  # task order, paths as is
    mapping = {"_target_": "fusion_bench.modelpool.HuggingFaceGPT2ClassificationPool",
               "models": {"_pretrained_": "gpt2", "gpt2_rte": {"pretrained_model_name_or_path": "tanganke/gpt2_rte"}},
               "tokenizer": {"pretrained_model_name_or_path": "gpt2"}}
    assert fusionbench_pool_args(mapping) == {"pretrained": "gpt2", "finetuned": {"rte": "tanganke/gpt2_rte"}, "tokenizer": "gpt2"}
    with pytest.raises(ValueError, match="_pretrained_"):
        fusionbench_pool_args({"models": [{"name": "cola", "path": "x"}]})
    with pytest.raises(ValueError, match="no GLUE task"):
        fusionbench_pool_args({"models": {"_pretrained_": "gpt2", "imdb": "x"}})


def test_fusionbench_pool_file_runs(fixtures_root, fixtures_config, pool_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pool_file = tmp_path / "fusionbench_pool.yaml"
    pool_file.write_text(yaml.safe_dump(fusionbench_pool(pool_paths)))
    assert from_fusionbench(pool_file).tasks == list(TASKS)
    base = {k: v for k, v in fixtures_config.items() if k != "pool"}
    base_file = tmp_path / "base.yaml"
    base_file.write_text(yaml.safe_dump(base))
    # --pool FILE, and the same content under pool: inside a -c config, give the same report.
    main(["test", "-c", str(base_file), "--pool", str(pool_file), "-c", str(CONFIGS / "methods" / "simple_average.yaml"),
          "--report_save_path", str(tmp_path / "a.json")])
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump({**base, "pool": fusionbench_pool(pool_paths)}))
    assert fusionbench_args(["-c", str(inline)])[1].startswith("{")
    main(["test", "-c", str(inline), "-c", str(CONFIGS / "methods" / "simple_average.yaml"),
          "--report_save_path", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert {t: a[t] for t in TASKS} == {t: b[t] for t in TASKS}


def test_fusionbench_report_is_read_by_compare(tmp_path):
    # FusionBench writes {task: {accuracy, loss}} (and sometimes no average).
    report = {t: {"accuracy": 0.5 + i / 100, "loss": 0.6} for i, t in enumerate(TASKS)}
    path = tmp_path / "fusion_bench_task_arithmetic.json"
    path.write_text(json.dumps(report))
    loaded = tables.load_report(path)
    assert loaded["average"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in report.values()) / 7)
    markdown = tables.compare([path], tmp_path / "out")
    assert "fusion_bench_task_arithmetic" in markdown and "| – |" in markdown  # no costs recorded
    assert (tmp_path / "out" / "table.md").is_file() and (tmp_path / "out" / "plot.png").stat().st_size > 0
