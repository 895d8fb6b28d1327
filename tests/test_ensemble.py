"""Simple Ensemble: its logits are the mean of the per-body logits; `mergelit test` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mergelit.__main__ import main
from mergelit.glue import GLUEDataModule
from mergelit.tasks import TASKS
from mergelit.methods.ensemble import SimpleEnsemble
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_logits_are_the_mean_of_each_bodys_logits(fixtures_root):
    """Reference: plain transformers, each fine-tuned classifier with the scored task's head."""
    from transformers import GPT2ForSequenceClassification

    config = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    pool = ModelPool(**config["pool"])
    ensemble = SimpleEnsemble(pool)
    ensemble.setup("test")
    data = GLUEDataModule(tasks=pool.tasks, tokenizer=pool.tokenizer_path, path=config["data"]["path"], cache_dir=None)
    models = [GPT2ForSequenceClassification.from_pretrained(pool.finetuned_paths[t]).eval() for t in pool.tasks]
    for task in ("mnli", "sst2"):
        batch = next(iter(data.eval_dataloader(task)))
        head = pool.head(task)
        per_body = []
        for model in models:
            model.score = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)  # the scored task's head
            model.score.weight.data.copy_(head)
            with torch.no_grad():
                per_body.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        expected = torch.stack(per_body).mean(0)
        with torch.no_grad():
            logits = ensemble(batch["input_ids"], batch["attention_mask"], task)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        # Not a single body's logits (the ensemble really mixes them).
        assert not torch.allclose(logits, per_body[0], atol=1e-4)
    assert not SimpleEnsemble.exportable and ensemble.bodies_at_inference() == len(pool.tasks)


def test_end_to_end(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "simple_ensemble.yaml"),
          "--data.batch_size", "64", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert list(report)[: len(TASKS) + 1] == [*TASKS, "average"]  # then mnli_mismatched, protocol
    assert all(0 <= report[t]["accuracy"] <= 1 and report[t]["loss"] > 0 for t in TASKS)
    assert report["average"]["accuracy"] == pytest.approx(sum(report[t]["accuracy"] for t in TASKS) / len(TASKS))
