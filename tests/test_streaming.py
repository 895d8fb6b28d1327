"""The per-tensor contract: the pool read tensor by tensor from safetensors equals transformers'
``from_pretrained``, and Simple Average, Task Arithmetic and TIES merged key by key (``merge_tensor``,
streamed from the checkpoints) equal their whole-body pure functions bit for bit (ties at the trim
cut, zeros, exact cancellations, both zero-sign fallbacks). A sweep reuses the λ-free parts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2_config, write_integer_pool
from safetensors.torch import save_file
from transformers import GPT2ForSequenceClassification, GPT2Model

import mergelit.methods.task_arithmetic as task_arithmetic_module
import mergelit.methods.ties as ties_module
from mergelit.methods.simple_average import SimpleAverage, simple_average_merge
from mergelit.methods.task_arithmetic import TaskArithmetic, task_arithmetic_merge
from mergelit.methods.ties import TiesMerging, ties_merge, ties_task_vector
from mergelit.pool import ModelPool, TaskTensors, _Checkpoint, check_checkpoint_folder
from mergelit.state_dict import flatten, trim


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key].contiguous().view(torch.int32), b[key].contiguous().view(torch.int32)), key


def write_random_pool(root, seed: int) -> dict:
    """An integer-valued tiny pool whose pretrained model is a bare ``GPT2Model`` written by transformers."""
    paths = write_integer_pool(root, seed)
    pool = ModelPool(**paths)
    model = GPT2Model(tiny_gpt2_config())
    model.load_state_dict(pool.pretrained_body())
    model.save_pretrained(paths["pretrained"])
    return paths


def make_pool(paths) -> ModelPool:
    return ModelPool(paths["pretrained"], paths["finetuned"], paths.get("tokenizer"))


# ---- the pool, tensor by tensor ------------------------------------------------------------


def test_tensors_equal_from_pretrained_state_dicts(pool_paths):
    pool = make_pool(pool_paths)
    reference = GPT2Model.from_pretrained(pool_paths["pretrained"]).state_dict()
    assert pool.keys() == list(reference)
    for key in pool.keys():
        assert torch.equal(pool.pretrained_tensor(key), reference[key])
    for task in pool.tasks:
        model = GPT2ForSequenceClassification.from_pretrained(pool_paths["finetuned"][task])
        body = model.transformer.state_dict()
        thetas = pool.finetuned_tensors("h.0.mlp.c_fc.weight")
        assert torch.equal(thetas[pool.tasks.index(task)], body["h.0.mlp.c_fc.weight"])
        for key in pool.keys():
            assert torch.equal(pool.finetuned_tensor(task, key), body[key])
        assert torch.equal(pool.head(task), model.score.weight)


def test_check_reads_headers_and_heads_only(pool_paths, monkeypatch):
    read = []
    original = _Checkpoint.tensor
    monkeypatch.setattr(_Checkpoint, "tensor", lambda self, name: read.append(name) or original(self, name))
    pool = make_pool(pool_paths)
    pool.check()
    assert read and set(read) == {"score.weight"}  # no body tensor is read to check the pool
    assert pool.task_config("cola").pad_token_id == 50256


def test_task_tensors_are_read_one_at_a_time(pool_paths, monkeypatch):
    pool = make_pool(pool_paths)
    thetas = pool.finetuned_tensors("wpe.weight")
    assert isinstance(thetas, TaskTensors) and len(thetas) == len(pool.tasks) and thetas.tasks == pool.tasks
    with pytest.raises(TypeError, match="one at a time"):
        thetas[1:]
    pool.check()  # heads read
    read = []
    original = _Checkpoint.tensor
    monkeypatch.setattr(_Checkpoint, "tensor", lambda self, name: read.append(name) or original(self, name))
    next(iter(thetas))
    assert read == ["transformer.wpe.weight"]


def test_bare_sharded_and_half_precision_checkpoints(tmp_path):
    paths = write_random_pool(tmp_path, seed=1)
    reference = GPT2Model.from_pretrained(paths["pretrained"], dtype=torch.float32).state_dict()
    # A sharded fp16 copy of one fine-tuned model: two files and an index.
    model = GPT2ForSequenceClassification.from_pretrained(paths["finetuned"]["rte"])
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shard = tmp_path / "rte_sharded"
    shard.mkdir()
    (shard / "config.json").write_text((tmp_path / "rte" / "config.json").read_text())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(shard / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    pool = make_pool(paths)
    loaded = GPT2ForSequenceClassification.from_pretrained(str(shard), dtype=torch.float32).transformer.state_dict()
    # The folder check looks for the body across all the shards (one of them lacks block 0).
    check_checkpoint_folder(str(shard), "fine-tuned model 'rte'")
    sharded = _Checkpoint(str(shard))
    assert set(sharded.files.values()) == {str(shard / file) for file in halves}
    sharded_pool = ModelPool(paths["pretrained"], {**paths["finetuned"], "rte": str(shard)})
    for key in pool.keys():
        assert torch.equal(pool.pretrained_tensor(key), reference[key])  # bare GPT2Model: no prefix
        value = sharded.tensor("transformer." + key)
        assert value.dtype == torch.float32 and torch.equal(value, loaded[key])
        assert torch.equal(sharded_pool.finetuned_tensor("rte", key), loaded[key])


# ---- merges: key by key == whole body, bit for bit -------------------------------------------


def test_per_key_merges_equal_the_whole_body_functions_on_the_tiny_pool(pool_paths):
    pool = make_pool(pool_paths)
    theta0, bodies = pool.pretrained_body(), pool.finetuned_bodies()
    assert_bits_equal(SimpleAverage(pool).merge(), simple_average_merge(bodies))
    assert_bits_equal(TaskArithmetic(pool, 0.5).merge(), task_arithmetic_merge(theta0, bodies, 0.5))
    assert_bits_equal(TiesMerging(pool, 0.6).merge(), ties_merge(theta0, bodies, 0.6))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 50, 100])
def test_per_key_ties_equals_the_whole_body_with_ties_and_zeros(tmp_path, seed, merge_func, threshold):
    pool = make_pool(write_integer_pool(tmp_path, seed=seed))
    theta0, bodies = pool.pretrained_body(), pool.finetuned_bodies()
    assert_bits_equal(TiesMerging(pool, 0.7, threshold, merge_func).merge(), ties_merge(theta0, bodies, 0.7, threshold, merge_func))
    assert_bits_equal(TaskArithmetic(pool, 0.3).merge(), task_arithmetic_merge(theta0, bodies, 0.3))
    assert_bits_equal(SimpleAverage(pool).merge(), simple_average_merge(bodies))


def test_both_zero_sign_fallbacks_are_exercised(tmp_path):
    # Across seeds the global majority sign Σ s comes out both positive and negative, and every pool
    # has entries whose summed sign is 0 (so the fallback matters for the bits compared above).
    fills = set()
    for seed in range(4):
        pool = make_pool(write_integer_pool(tmp_path / str(seed), seed=seed))
        bodies, theta0 = pool.finetuned_bodies(), pool.pretrained_body()
        trimmed = [trim(flatten(b).sub_(flatten(theta0)), 20) for b in bodies.values()]
        sign = sum(trimmed).sign()
        assert (sign == 0).any()
        fills.add(int(torch.sign(sign.sum())))
    assert fills == {-1, 1}


def test_threshold_at_most_one_is_a_fraction(tmp_path):
    pool = make_pool(write_integer_pool(tmp_path, seed=2))
    assert_bits_equal(TiesMerging(pool, 0.5, 0.2).merge(), TiesMerging(pool, 0.5, 20).merge())
    assert_bits_equal(TiesMerging(pool, 0.5, 1).merge(), TiesMerging(pool, 0.5, 100).merge())


def test_lambda_free_part_is_reused_across_a_sweep(pool_paths, monkeypatch):
    pool = make_pool(pool_paths)
    theta0, bodies = pool.pretrained_body(), pool.finetuned_bodies()
    expected = {lam: ties_merge(theta0, bodies, lam) for lam in (0.3, 0.6, 1.0)}
    expected_ta = {lam: task_arithmetic_merge(theta0, bodies, lam) for lam in (0.3, 0.7)}
    expected_50 = ties_merge(theta0, bodies, 0.3, 50)
    elections, sums = [], []
    election, summed = ties_module.ties_election, task_arithmetic_module.task_vector_sum
    monkeypatch.setattr(ties_module, "ties_election", lambda *a: elections.append(1) or election(*a))
    monkeypatch.setattr(task_arithmetic_module, "task_vector_sum", lambda *a: sums.append(1) or summed(*a))
    pool.keep_reused(True)
    for scaling_factor, reference in expected.items():
        assert_bits_equal(TiesMerging(pool, scaling_factor).merge(), reference)
    assert len(elections) == 1  # the whole-body pass once, for three λ
    for scaling_factor, reference in expected_ta.items():
        assert_bits_equal(TaskArithmetic(pool, scaling_factor).merge(), reference)
    assert len(sums) == len(pool.keys())  # Σ τi once per key, for two λ
    # Another threshold is another τm; without keep_reused nothing is kept.
    assert_bits_equal(TiesMerging(pool, 0.3, 50).merge(), expected_50)
    assert len(elections) == 2
    plain = make_pool(pool_paths)
    TiesMerging(plain, 0.3).merge()
    TiesMerging(plain, 0.6).merge()
    assert len(elections) == 4
