"""`mergelit fit`: fine-tuning raises accuracy, exports a checkpoint transformers and `mergelit test` load, resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.finetune import FineTuneCLI, GLUETaskDataModule, load_classifier
from mergelit.tasks import GLUE_TASKS
from mergelit.synthetic import write_glue

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def sst2_data(tmp_path_factory) -> Path:
    """Synthetic SST-2 with enough rows to learn from in a few steps (sentiment words decide the label)."""
    return write_glue(tmp_path_factory.mktemp("glue"), seed=0, num_train=320, num_validation=96, tasks=["sst2"])


def fit_args(pretrained: str, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything", "0", "--model.pretrained", pretrained, "--model.learning_rate", "5e-3",
        "--data.task", "sst2", "--data.path", str(data), "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1", *extra,
    ]


def test_fit_learns_and_exports_a_checkpoint_for_the_pool(pool_paths, sst2_data, tmp_path, monkeypatch):
    """From the fixture's "pretrained" GPT2LMHeadModel: a fresh head scores near chance, three epochs of
    `mergelit fit` score well above it; the export loads in plain transformers with the spec's pad
    token and label names, and `mergelit test` scores it exactly as fit's validation did."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    pretrained = pool_paths["pretrained"]
    torch.manual_seed(0)
    start = tmp_path / "start"  # the starting point: the pretrained body and a freshly initialised head
    load_classifier(pretrained, 2).save_pretrained(start)
    AutoTokenizer.from_pretrained(pool_paths["tokenizer"]).save_pretrained(start)

    export = tmp_path / "gpt2_sst2"
    main(fit_args(pretrained, sst2_data, tmp_path, "--trainer.max_epochs", "3", "--export.dirpath", str(export)))

    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert list(export.glob("*.safetensors"))
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == 50256
    assert model.config.num_labels == GLUE_TASKS["sst2"].num_labels
    assert [model.config.id2label[i] for i in range(2)] == list(GLUE_TASKS["sst2"].label_names)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.pad_token_id == 50256

    def score(folder: Path, name: str) -> float:
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({
            "pool": {"pretrained": pretrained, "finetuned": {"sst2": str(folder)}},
            "data": {"path": str(sst2_data), "cache_dir": str(tmp_path / "cache")},
            "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
        }))
        report = tmp_path / f"{name}.json"
        main(["test", "-c", str(config), "-c", str(CONFIGS / "methods" / "individual.yaml"),
              "--model.init_args.task", "sst2", "--report_save_path", str(report)])
        return json.loads(report.read_text())["sst2"]["accuracy"]

    before, after = score(start, "before"), score(export, "after")
    assert before < 0.7 < after, (before, after)
    # Same data, tokenization and read-out in training and in evaluation: fit's last validation
    # accuracy (logged to the CSV logger) is exactly what `mergelit test` measures on the export.
    metrics = sorted(tmp_path.glob("lightning_logs/version_*/metrics.csv"))
    import csv

    rows = [r for r in csv.DictReader(metrics[0].open()) if r.get("val/accuracy")]
    assert len(rows) == 3  # validation accuracy each epoch
    assert float(rows[-1]["val/accuracy"]) == pytest.approx(after, abs=1e-6)


def test_fit_resumes_from_a_lightning_checkpoint(pool_paths, sst2_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = fit_args(pool_paths["pretrained"], sst2_data, tmp_path, "--export.dirpath", str(tmp_path / "export"),
                    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1")
    first = FineTuneCLI(args=[*args, "--trainer.max_epochs", "1"])
    steps_per_epoch = first.trainer.global_step
    checkpoint = next(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    resumed = FineTuneCLI(args=[*args, "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 2 * steps_per_epoch  # the first epoch was not trained again
    # The learning-rate schedule continued too: it reached 0 at the last step of two epochs.
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_train_order_is_seeded_and_changes_each_epoch(sst2_data, pool_paths, tmp_path):
    def order(seed: int, epoch: int) -> list[int]:
        data = GLUETaskDataModule("sst2", tokenizer=pool_paths["tokenizer"], path=str(sst2_data), shuffle_seed=seed, cache_dir=None)
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)  # Lightning calls this at the start of each epoch
        return list(loader.sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == list(range(320))


def test_shipped_config_parses_without_loading():
    """The real-GLUE config combines with a task; parsing loads neither weights nor data."""
    config = CONFIGS / "finetune" / "gpt2_glue.yaml"
    assert config.read_text().startswith("#")
    cli = FineTuneCLI(args=["-c", str(config), "--data.task", "mnli"], run=False)
    assert cli.model.task == "mnli" and cli.model.num_labels == 3
    assert cli.model.hparams.learning_rate == 5e-5 and cli.trainer.max_epochs == 3
    assert cli.datamodule.tokenizer_path == "gpt2"
    assert cli.model.model is None and not cli.datamodule._raw


def test_unknown_task_is_named(capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        FineTuneCLI(args=["-c", str(CONFIGS / "finetune" / "gpt2_glue.yaml"), "--data.task", "wnli"], run=False)
    assert "wnli" in str(error.value) + capsys.readouterr().err


def test_starts_from_a_bare_gpt2model_checkpoint(pool_paths, tmp_path):
    """A GPT2Model folder (no LM head, no `transformer.` prefix) gives its body and a fresh head."""
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(pool_paths["pretrained"])
    lm.transformer.save_pretrained(tmp_path / "bare")
    classifier = load_classifier(str(tmp_path / "bare"), 3, ["entailment", "neutral", "contradiction"])
    body = lm.transformer.state_dict()
    assert all(torch.equal(body[k], v) for k, v in classifier.transformer.state_dict().items())
    assert classifier.score.weight.shape == (3, lm.config.n_embd) and classifier.score.weight.abs().sum() > 0
    assert classifier.config.pad_token_id == 50256 and classifier.config.id2label[2] == "contradiction"
