"""Statistics predict loops (Fisher, Gram) against hand-written references, and their cache."""

from __future__ import annotations

import functools
import json
import os

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

from mergelit import statistics
from mergelit.glue import GLUEDataModule
from mergelit.gpt2 import build_body
from mergelit.pool import ModelPool
from mergelit.statistics import (
    FisherStatistics,
    GramStatistics,
    batches_of,
    draw_examples,
    read_statistics,
    statistics_loader,
    write_statistics,
)

PAD = 49


def tiny_config(num_labels: int = 3) -> GPT2Config:
    return GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=num_labels,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
    )


@pytest.fixture(scope="module")
def tiny():
    """A tiny random GPT-2 classifier and 20 rows of 2 to 12 tokens (none is the pad id)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(tiny_config()).eval()
        # Non-trivial weights everywhere (zero biases would hide transposition errors).
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        generator = torch.Generator().manual_seed(1)
        rows = [
            {"input_ids": torch.randint(0, PAD, (int(n),), generator=generator).tolist(), "label": 0}
            for n in torch.randint(2, 13, (20,), generator=generator)
        ]
    return model, rows


def collate(rows, width=None):
    width = width or max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def run_fisher(model, rows, batches, **trainer_kwargs) -> dict[str, torch.Tensor]:
    body = build_body(model.config, model.transformer.state_dict())
    loader = functools.partial(statistics_loader, rows, batches, collate)
    module = FisherStatistics(body, model.score.weight.detach(), PAD, loader)
    trainer(**trainer_kwargs).predict(module, return_predictions=False)
    assert module.num_examples() == sum(len(b) for b in batches)
    return module.fisher()


def reference_fisher(model, rows, batches) -> dict[str, torch.Tensor]:
    """The spec's Fisher with plain autograd on HF's own classifier: per batch, (∂S/∂θ)² summed; / N."""
    total = {name: torch.zeros_like(p) for name, p in model.transformer.named_parameters()}
    for batch in batches:
        inputs = collate([rows[i] for i in batch])
        logits = model(**inputs).logits
        p = torch.softmax(logits, dim=-1).detach()
        s = (torch.sqrt(p) * torch.log_softmax(logits, dim=-1)).sum()
        model.zero_grad()
        s.backward()
        for name, parameter in model.transformer.named_parameters():
            total[name] += parameter.grad**2
    count = sum(len(b) for b in batches)
    return {name: value / count for name, value in total.items()}


@pytest.mark.parametrize("inference_mode", [True, False])
def test_fisher_equals_plain_autograd_on_the_same_batches(tiny, inference_mode):
    model, rows = tiny
    batches = batches_of(draw_examples(len(rows), 16, seed=3), 4)
    fisher = run_fisher(model, rows, batches, inference_mode=inference_mode)
    expected = reference_fisher(model, rows, batches)
    assert fisher.keys() == expected.keys() == model.transformer.state_dict().keys()
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-10, msg=name)
    assert all(fisher[name].abs().sum() > 0 for name in ("wte.weight", "h.1.mlp.c_fc.weight", "ln_f.bias"))


def test_fisher_depends_on_the_batch_grouping(tiny):
    """The gradient of a batch sum is squared: the same rows in other batches give another Fisher."""
    model, rows = tiny
    indices = draw_examples(len(rows), 16, seed=3)
    by_4 = run_fisher(model, rows, batches_of(indices, 4))
    by_8 = run_fisher(model, rows, batches_of(indices, 8))
    assert not torch.allclose(by_4["h.0.attn.c_attn.weight"], by_8["h.0.attn.c_attn.weight"], rtol=1e-3)


def captured_inputs(body: GPT2Model, batch) -> dict[str, torch.Tensor]:
    """Each Conv1D's input, [batch, length, in], captured with forward hooks."""
    from transformers.pytorch_utils import Conv1D

    captured, handles = {}, []
    for name, module in body.named_modules():
        if isinstance(module, Conv1D):
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, args[0])))
    with torch.no_grad():
        body(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("count_padding", [True, False])
def test_grams_equal_xtx_over_t_from_captured_inputs(tiny, count_padding):
    model, rows = tiny
    width = 32 if count_padding else None  # counting padding: rows padded to a fixed max_length
    batches = batches_of(draw_examples(len(rows), 12, seed=5), 5)  # 5 + 5 + 2 rows
    pad_collate = functools.partial(collate, width=width)
    body = build_body(model.config, model.transformer.state_dict())
    module = GramStatistics(body, count_padding, functools.partial(statistics_loader, rows, batches, pad_collate))
    trainer().predict(module, return_predictions=False)
    grams = module.grams()

    reference_body = GPT2Model(model.config).eval()
    reference_body.load_state_dict(model.transformer.state_dict())
    stacked: dict[str, list[torch.Tensor]] = {}
    for batch_indices in batches:
        batch = pad_collate([rows[i] for i in batch_indices])
        keep = torch.ones_like(batch["attention_mask"]) if count_padding else batch["attention_mask"]
        for name, x in captured_inputs(reference_body, batch).items():
            stacked.setdefault(name, []).append(x[keep.bool()].double())
    assert len(grams) == 4 * model.config.n_layer and grams.keys() == stacked.keys()
    num_real_tokens = sum(len(rows[i]["input_ids"]) for b in batches for i in b)
    for name, pieces in stacked.items():
        x = torch.cat(pieces)
        assert len(x) == (12 * width if count_padding else num_real_tokens)
        torch.testing.assert_close(grams[name], x.T @ x / len(x), rtol=1e-9, atol=1e-12, msg=name)


def test_counting_padding_changes_the_grams(tiny):
    model, rows = tiny
    batches = batches_of(draw_examples(len(rows), 8, seed=5), 4)
    results = {}
    for count_padding in (True, False):
        body = build_body(model.config, model.transformer.state_dict())
        loader = functools.partial(statistics_loader, rows, batches, functools.partial(collate, width=32))
        module = GramStatistics(body, count_padding, loader)
        trainer().predict(module, return_predictions=False)
        results[count_padding] = module.grams()["h.0.attn.c_attn"]
    assert not torch.allclose(results[True], results[False], rtol=1e-2)


def test_draw_is_seeded_and_disjoint_batches_cover_it():
    indices = draw_examples(100, 30, seed=7)
    assert indices == draw_examples(100, 30, seed=7) != draw_examples(100, 30, seed=8)
    assert len(set(indices)) == 30 and all(0 <= i < 100 for i in indices)
    assert sorted(draw_examples(10, 50, seed=0)) == list(range(10))  # more than the split: every row
    batches = batches_of(indices, 8)
    assert [len(b) for b in batches] == [8, 8, 8, 6] and sum(batches, []) == indices
    # Two processes: each takes every other batch; together exactly the drawn rows, once each.
    shards = [list(statistics_loader(list(range(100)), batches, list, rank=r, world_size=2).batch_sampler) for r in (0, 1)]
    assert sorted(i for shard in shards for b in shard for i in b) == sorted(indices)


# ---- the cache file ------------------------------------------------------------------------
def test_statistics_file_round_trip_and_untrusted_files(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    path = write_statistics(tmp_path / "s.safetensors", tensors, {"key": "k1", "indices": json.dumps([3, 1])})
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left
    loaded, metadata = read_statistics(path, "k1")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert json.loads(metadata["indices"]) == [3, 1]

    with pytest.warns(UserWarning, match="not trusted.*key"):
        assert read_statistics(path, "another key") is None
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        assert read_statistics(path, "k1") is None
    path.write_bytes(path.read_bytes()[: len(data) // 2])  # a half-written file
    with pytest.warns(UserWarning, match="unreadable"):
        assert read_statistics(path, "k1") is None
    assert read_statistics(tmp_path / "missing.safetensors", "k1") is None


def test_a_write_killed_before_the_rename_leaves_nothing_to_trust(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(statistics.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_statistics(path, {"a": torch.ones(3)}, {"key": "k"})
    assert not path.exists() and list(tmp_path.iterdir()) == []


# ---- orchestration: cache hit, miss, determinism (real pool and data) -------------------------
@pytest.fixture()
def one_task(fixtures_root):
    """The fixtures' pool and data, reduced to RTE (the machinery is per task)."""
    import yaml

    config = yaml.safe_load((fixtures_root / "config.yaml").read_text())
    tasks = ["rte"]
    finetuned = {t: config["pool"]["finetuned"][t] for t in tasks}
    pool = ModelPool(config["pool"]["pretrained"], finetuned, config["pool"].get("tokenizer"))
    data = GLUEDataModule(tasks=tasks, tokenizer=pool.tokenizer_path, path=config["data"]["path"], cache_dir=None)
    return pool, data


def counting_predicts(monkeypatch) -> list:
    calls = []
    original = L.Trainer.predict
    monkeypatch.setattr(L.Trainer, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_second_call_loads_from_the_cache_and_a_changed_key_recomputes(one_task, tmp_path, monkeypatch):
    pool, data = one_task
    calls = counting_predicts(monkeypatch)
    arguments = dict(num_examples=12, batch_size=4, seed=1, cache_dir=tmp_path)
    first = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert len(calls) == 1 and [p.name.split("-")[0] for p in (tmp_path / "fisher").iterdir()] == ["rte"]
    again = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert len(calls) == 1  # served from the cache
    assert all(torch.equal(first[t][k], again[t][k]) for t in first for k in first[t])
    # The stored indices are the seeded draw.
    path = next((tmp_path / "fisher").glob("rte-*.safetensors"))
    assert json.loads(read_statistics(path)[1]["indices"]) == draw_examples(len(data.train_dataset("rte")), 12, 1)

    for changed in ({"seed": 2}, {"batch_size": 6}):
        statistics.fisher_statistics(trainer(), data, pool, **{**arguments, **changed})
    assert len(calls) == 3 and len(list((tmp_path / "fisher").iterdir())) == 3
    # A recomputation gives bit-identical statistics (deterministic run to run).
    for file in (tmp_path / "fisher").glob("*.safetensors"):
        file.unlink()
    recomputed = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert all(torch.equal(first[t][k], recomputed[t][k]) for t in first for k in first[t])


def test_gram_cache_is_keyed_by_the_padding_mode_and_a_damaged_file_is_recomputed(one_task, tmp_path, monkeypatch):
    pool, data = one_task
    calls = counting_predicts(monkeypatch)
    arguments = dict(num_examples=8, batch_size=4, seed=0, cache_dir=tmp_path)
    counted = statistics.gram_statistics(trainer(), data, pool, count_padding=True, **arguments)
    real_only = statistics.gram_statistics(trainer(), data, pool, count_padding=False, **arguments)
    assert len(calls) == 2 and len(list((tmp_path / "regmean").iterdir())) == 2
    assert not torch.allclose(counted["rte"]["h.0.mlp.c_fc"], real_only["rte"]["h.0.mlp.c_fc"], rtol=1e-2)
    # Same key, damaged content: not trusted, recomputed, rewritten.
    for path in (tmp_path / "regmean").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        again = statistics.gram_statistics(trainer(), data, pool, count_padding=True, **arguments)
    assert len(calls) == 3
    assert sum(read_statistics(path) is not None for path in (tmp_path / "regmean").iterdir()) == 1
    assert all(torch.equal(counted[t][k], again[t][k]) for t in counted for k in counted[t])


def test_loops_cut_short_are_not_cached(one_task, tmp_path):
    pool, data = one_task
    with pytest.warns(UserWarning, match="saw 4 of 12 examples; not caching"):
        statistics.fisher_statistics(
            trainer(limit_predict_batches=1), data, pool, num_examples=12, batch_size=4, cache_dir=tmp_path
        )
    assert not (tmp_path / "fisher").exists() or not list((tmp_path / "fisher").iterdir())
