"""GLUEDataModule: tokenization as the spec says, batching, cache key, clear errors."""

from __future__ import annotations

import shutil

import datasets
import pytest
import torch

from mergelit.glue import GLUEDataModule, LengthSortedBatches, load_tokenizer
from mergelit.tasks import GLUE_TASKS, TASKS
from mergelit.methods import TaskArithmetic
from mergelit.pool import ModelPool


def datamodule(fixtures_root, pool_paths, tmp_path, **kwargs) -> GLUEDataModule:
    kwargs.setdefault("tasks", list(TASKS))
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return GLUEDataModule(tokenizer=pool_paths["tokenizer"], path=str(fixtures_root / "glue"), **kwargs)


def test_tokenization_is_plain_gpt2_bpe(fixtures_root, pool_paths, tmp_path):
    """No template, separator, BOS or EOS; a pair is the two token lists concatenated."""
    data = datamodule(fixtures_root, pool_paths, tmp_path)
    tokenizer = load_tokenizer(pool_paths["tokenizer"])
    assert tokenizer.pad_token_id == 50256 and tokenizer.padding_side == "right"
    for task in TASKS:
        fields = GLUE_TASKS[task].text_fields
        raw = data.raw(task, GLUE_TASKS[task].eval_split)
        tokenized = data.eval_dataset(task)
        assert len(tokenized) == len(raw)
        for i in range(0, len(raw), 7):
            expected = []
            for field in fields:  # the second segment is tokenized on its own
                expected += tokenizer(raw[i][field])["input_ids"]
            assert tokenized[i]["input_ids"] == expected
            assert tokenized[i]["label"] == raw[i]["label"]
            assert 50256 not in tokenized[i]["input_ids"]


def test_truncation_is_longest_first_at_max_length(fixtures_root, pool_paths, tmp_path):
    data = datamodule(fixtures_root, pool_paths, tmp_path, tasks=["rte"], max_length=12)
    tokenizer = load_tokenizer(pool_paths["tokenizer"])
    raw = data.raw("rte", "validation")
    tokenized = data.eval_dataset("rte")
    for i in range(len(raw)):
        a = tokenizer(raw[i]["sentence1"])["input_ids"]
        b = tokenizer(raw[i]["sentence2"])["input_ids"]
        expected = tokenizer(raw[i]["sentence1"], raw[i]["sentence2"], truncation="longest_first", max_length=12)
        assert tokenized[i]["input_ids"] == expected["input_ids"]
        assert len(tokenized[i]["input_ids"]) == min(12, len(a) + len(b))


def test_loaders_cover_each_example_once_in_task_order(fixtures_root, pool_paths, tmp_path):
    data = datamodule(fixtures_root, pool_paths, tmp_path, batch_size=8)
    data.prepare_data()
    data.setup("test")
    loaders = data.test_dataloader()
    # Loader i is task i; MNLI's validation_mismatched (the fixtures have it) comes after the seven.
    assert len(loaders) == len(TASKS) + 1
    for task, loader in zip(TASKS, loaders):
        labels = torch.cat([batch["labels"] for batch in loader])
        expected = torch.tensor(data.raw(task, GLUE_TASKS[task].eval_split)["label"])
        assert sorted(labels.tolist()) == sorted(expected.tolist())
        for batch in loader:
            mask = batch["attention_mask"]
            # right padding with the pad id, no all-padding column
            assert (batch["input_ids"][mask == 0] == 50256).all()
            assert mask[:, -1].any() and (mask.sum(1) >= 1).all()
            assert (mask.cumsum(1) == torch.arange(1, mask.shape[1] + 1).clamp(max=mask.sum(1, keepdim=True))).all()


def test_length_sorted_batches_shard_without_repeats():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    whole = [i for batch in LengthSortedBatches(lengths, 3) for i in batch]
    assert sorted(whole) == list(range(len(lengths)))
    assert [lengths[i] for i in whole] == sorted(lengths, reverse=True)
    shards = [[i for batch in LengthSortedBatches(lengths, 3, 3, rank) for i in batch] for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(lengths)))


def test_dynamic_padding_gives_the_same_predictions_as_padding_to_512(fixtures_root, pool_paths, tmp_path):
    pool = ModelPool(pool_paths["pretrained"], pool_paths["finetuned"], pool_paths["tokenizer"])
    model = TaskArithmetic(pool, scaling_factor=0.5)
    model.setup("test")
    dynamic = datamodule(fixtures_root, pool_paths, tmp_path, batch_size=8)
    padded = datamodule(fixtures_root, pool_paths, tmp_path, batch_size=8, pad_to_max_length=True)
    for task in ("cola", "mnli", "qqp"):
        with torch.no_grad():
            for a, b in zip(dynamic.eval_dataloader(task), padded.eval_dataloader(task)):
                assert b["input_ids"].shape[1] == 512 and a["input_ids"].shape[1] < 512
                logits_a = model(a["input_ids"], a["attention_mask"], task)
                logits_b = model(b["input_ids"], b["attention_mask"], task)
                assert torch.equal(logits_a.argmax(-1), logits_b.argmax(-1))
                torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)


def test_cache_key_includes_the_tokenizer(fixtures_root, pool_paths, tmp_path):
    """A different tokenizer must not reuse the cached token ids (FusionBench's cache does)."""
    cache = tmp_path / "cache"
    first = datamodule(fixtures_root, pool_paths, tmp_path, tasks=["sst2"])
    ids = first.eval_dataset("sst2")["input_ids"]
    files = set(cache.glob("*.arrow"))
    assert files
    # Same everything -> served from the cache file (no new file).
    again = datamodule(fixtures_root, pool_paths, tmp_path, tasks=["sst2"])
    assert again.eval_dataset("sst2")["input_ids"] == ids
    assert set(cache.glob("*.arrow")) == files
    # A tokenizer with one merge fewer tokenizes differently and gets its own cache entry.
    other = tmp_path / "other_tokenizer"
    shutil.copytree(pool_paths["tokenizer"], other, ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json"))
    merges = (other / "merges.txt").read_text().splitlines()
    (other / "merges.txt").write_text("\n".join(m for m in merges if m != "Ġ t") + "\n")
    changed = GLUEDataModule(tasks=["sst2"], tokenizer=str(other), path=str(fixtures_root / "glue"), cache_dir=str(cache))
    assert changed.eval_dataset("sst2")["input_ids"] != ids
    assert len(set(cache.glob("*.arrow"))) > len(files)
    # A different max length is a different key too.
    short = datamodule(fixtures_root, pool_paths, tmp_path, tasks=["sst2"], max_length=4)
    assert max(len(x) for x in short.eval_dataset("sst2")["input_ids"]) <= 4


def test_missing_task_folder_is_named(fixtures_root, pool_paths, tmp_path):
    root = tmp_path / "glue"
    shutil.copytree(fixtures_root / "glue", root)
    shutil.rmtree(root / "qnli")
    data = GLUEDataModule(tokenizer=pool_paths["tokenizer"], path=str(root), cache_dir=None)
    with pytest.raises(FileNotFoundError, match="qnli"):
        data.prepare_data()


def test_missing_split_is_named(fixtures_root, pool_paths, tmp_path):
    root = tmp_path / "glue"
    shutil.copytree(fixtures_root / "glue", root)
    mnli = datasets.load_from_disk(str(fixtures_root / "glue" / "mnli"))
    shutil.rmtree(root / "mnli")
    datasets.DatasetDict({"train": mnli["train"], "validation": mnli["validation_matched"]}).save_to_disk(str(root / "mnli"))
    data = GLUEDataModule(tokenizer=pool_paths["tokenizer"], path=str(root), cache_dir=None)
    with pytest.raises(KeyError, match="validation_matched"):
        data.prepare_data()


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="stsb"):
        GLUEDataModule(tasks=["cola", "stsb"])
