"""Statistics predict loops (Fisher, Gram) against hand-written references, their cache and their costs."""

from __future__ import annotations

import functools
import json
import os

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

from mergelit import costs, statistics
from mergelit.glue import GLUEDataModule
from mergelit.gpt2 import build_body
from mergelit.methods.fisher import FisherMerging
from mergelit.pool import ModelPool
from mergelit.statistics import (
    FisherStatistics,
    GramStatistics,
    StoredStatistics,
    batches_of,
    draw_examples,
    read_statistics,
    statistics_loader,
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


# ---- orchestration: cache hit, miss, determinism, costs (real pool and data) --------------------
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


def read_all(stored: StoredStatistics) -> dict[str, dict[str, torch.Tensor]]:
    """Every statistic, read now (a StoredStatistics reads its file when asked)."""
    return {task: {name: stored.tensor(task, name) for name in stored.names(task)} for task in stored.tasks}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a)


def test_second_call_loads_from_the_cache_and_a_changed_key_recomputes(one_task, tmp_path, monkeypatch):
    pool, data = one_task
    calls = counting_predicts(monkeypatch)
    arguments = dict(num_examples=12, batch_size=4, seed=1, cache_dir=tmp_path)
    stored = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    (path,) = (tmp_path / "fisher").glob("rte-*.safetensors")
    assert len(calls) == 1 and stored.sources == {"rte": path}  # read from its file, one tensor at a time
    first = read_all(stored)
    assert first["rte"].keys() == set(pool.keys()) and first["rte"]["h.0.mlp.c_fc.weight"].dtype == torch.float32
    again = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert len(calls) == 1  # served from the cache
    assert same(first, read_all(again))
    # The file holds the seeded draw, what the key was made of, and what computing it cost.
    tensors, metadata = read_statistics(path)
    assert same({"rte": tensors}, first)
    assert json.loads(metadata["indices"]) == draw_examples(len(data.train_dataset("rte")), 12, 1)
    fields = json.loads(metadata["fields"])
    assert (fields["model"], fields["seed"], fields["batch_size"], fields["num_examples"]) == (pool.fingerprint("rte"), 1, 4, 12)
    assert float(metadata["seconds"]) > 0 and float(metadata["peak_gb"]) >= 0

    for changed in ({"seed": 2}, {"batch_size": 6}, {"num_examples": 11}):
        statistics.fisher_statistics(trainer(), data, pool, **{**arguments, **changed})
    assert len(calls) == 4 and len(list((tmp_path / "fisher").iterdir())) == 4
    # A recomputation gives bit-identical statistics (deterministic run to run).
    for file in (tmp_path / "fisher").glob("*.safetensors"):
        file.unlink()
    recomputed = statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert len(calls) == 5 and same(first, read_all(recomputed))


def test_gram_cache_is_keyed_by_the_padding_mode_and_a_damaged_file_is_recomputed(one_task, tmp_path, monkeypatch):
    pool, data = one_task
    calls = counting_predicts(monkeypatch)
    arguments = dict(num_examples=8, batch_size=4, seed=0, cache_dir=tmp_path)
    counted = read_all(statistics.gram_statistics(trainer(), data, pool, count_padding=True, **arguments))
    real_only = read_all(statistics.gram_statistics(trainer(), data, pool, count_padding=False, **arguments))
    assert len(calls) == 2 and len(list((tmp_path / "regmean").iterdir())) == 2
    assert counted["rte"].keys() == {f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert counted["rte"]["h.0.mlp.c_fc"].dtype == torch.float64
    assert not torch.allclose(counted["rte"]["h.0.mlp.c_fc"], real_only["rte"]["h.0.mlp.c_fc"], rtol=1e-2)
    # Same key, damaged content: not trusted (the cache's one message), recomputed, rewritten.
    for path in (tmp_path / "regmean").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="RegMean Gram matrices cache file .* is not trusted .*unreadable.*recomputing"):
        again = read_all(statistics.gram_statistics(trainer(), data, pool, count_padding=True, **arguments))
    assert len(calls) == 3
    assert sum(read_statistics(path) is not None for path in (tmp_path / "regmean").iterdir()) == 1
    assert same(counted, again)


def test_a_changed_bit_is_not_trusted_and_a_killed_write_leaves_no_file(one_task, tmp_path, monkeypatch):
    pool, data = one_task
    calls = counting_predicts(monkeypatch)
    arguments = dict(num_examples=8, batch_size=4, seed=0, cache_dir=tmp_path)
    first = read_all(statistics.fisher_statistics(trainer(), data, pool, **arguments))
    (path,) = (tmp_path / "fisher").iterdir()
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(content))
    with pytest.warns(UserWarning, match="not trusted .*checksum"):
        again = read_all(statistics.fisher_statistics(trainer(), data, pool, **arguments))
    assert len(calls) == 2 and same(first, again) and read_statistics(path) is not None  # rewritten

    path.unlink()

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr("mergelit.cache.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        statistics.fisher_statistics(trainer(), data, pool, **arguments)
    assert list((tmp_path / "fisher").iterdir()) == []  # nothing half-written to trust later


def test_loops_cut_short_are_not_cached_but_still_used(one_task, tmp_path):
    pool, data = one_task
    with pytest.warns(UserWarning, match="saw 4 of 12 examples; not caching"):
        stored = statistics.fisher_statistics(
            trainer(limit_predict_batches=1), data, pool, num_examples=12, batch_size=4, cache_dir=tmp_path
        )
    assert not (tmp_path / "fisher").exists() or not list((tmp_path / "fisher").iterdir())
    assert isinstance(stored.sources["rte"], dict) and stored.tensor("rte", "wte.weight").abs().sum() > 0


def test_rows_held_out_by_the_data_are_not_drawn(one_task, tmp_path):
    pool, _ = one_task
    data = GLUEDataModule(tasks=["rte"], tokenizer=pool.tokenizer_path, path=one_task[1].path, cache_dir=None,
                          dev_source="train", dev_size=20, hold_out_dev=True)
    statistics.gram_statistics(trainer(), data, pool, num_examples=30, batch_size=10, count_padding=False, cache_dir=tmp_path)
    (path,) = (tmp_path / "regmean").iterdir()
    drawn = json.loads(read_statistics(path)[1]["indices"])
    held_out = data.held_out_rows("rte", "train")
    assert len(held_out) == 20 and len(drawn) == 30 and not set(drawn) & set(held_out)


# ---- costs: a cached run shows what the statistics originally cost --------------------------------
def prepared_costs(method, data) -> costs.CostRecord:
    """``method.prepare`` inside a prepare phase of a new cost record (as ``mergelit test`` runs it)."""
    record = costs.CostRecord()
    with costs.recording(record), costs.phase("prepare"):
        method.prepare(trainer(), data)
    return record


def test_a_cached_run_records_the_original_cost(one_task, tmp_path):
    pool, data = one_task
    fresh = prepared_costs(FisherMerging(pool, num_fisher_examples=12, batch_size=4, cache_dir=str(tmp_path)), data)
    assert fresh.as_dict()["prepare_cached"] is False and "prepare_original_seconds" not in fresh.as_dict()
    (path,) = (tmp_path / "fisher").iterdir()
    metadata = read_statistics(path)[1]
    stored_seconds, stored_peak = float(metadata["seconds"]), float(metadata["peak_gb"])
    # The stored cost is the predict loop's, inside this run's prepare phase.
    assert 0 < stored_seconds <= fresh.seconds("prepare")

    cached = prepared_costs(FisherMerging(pool, num_fisher_examples=12, batch_size=4, cache_dir=str(tmp_path)), data)
    report = cached.as_dict()
    prepare = cached.phases["prepare"]
    assert report["prepare_cached"] is True
    assert prepare.cached_seconds == stored_seconds and prepare.cached_peak_gb == stored_peak
    assert 0 < prepare.cache_read_seconds <= report["prepare_seconds"]
    assert report["prepare_original_seconds"] == pytest.approx(
        report["prepare_seconds"] - prepare.cache_read_seconds + stored_seconds
    )
    assert report["prepare_original_seconds"] >= stored_seconds
    assert report["prepare_original_peak_gb"] >= stored_peak


def test_measuring_the_predict_loop_keeps_the_prepare_phase_peak_whole():
    """The statistics reset the peak window around each predict loop; the enclosing prepare phase
    still counts the peak it reached before (here a 256 MB buffer freed before the loop)."""
    import mmap

    record = costs.CostRecord()
    with costs.recording(record), costs.phase("prepare"):
        # 256 MB of fresh pages, touched (an anonymous map: never pages the allocator kept resident
        # from earlier tests, which would not raise the peak), then returned.
        buffer = mmap.mmap(-1, 256 * 2**20)
        for offset in range(0, len(buffer), mmap.PAGESIZE):
            buffer[offset] = 1
        buffer.close()
        with costs.measured() as measure:
            small = torch.ones(2**20)  # 4 MB
            del small
    assert measure.seconds > 0 and measure.peak_gb < 0.2  # the loop's own window: the small buffer only
    assert record.phases["prepare"].peak_gb >= 0.25  # the phase's window: the 256 MB buffer too
