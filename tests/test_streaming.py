"""Streaming merges: the pool read tensor by tensor from safetensors equals the whole-body API bit
for bit, and Simple Average, Task Arithmetic and TIES merged piece by piece equal the in-memory
pure functions bit for bit (ties, zeros, exact cancellations, both zero-sign fallbacks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

import mergelit.methods.simple_average as simple_average_module
import mergelit.methods.task_arithmetic as task_arithmetic_module
import mergelit.methods.ties as ties_module
from mergelit.methods.simple_average import SimpleAverage, simple_average_merge, simple_average_streamed
from mergelit.methods.task_arithmetic import TaskArithmetic, task_arithmetic_merge, task_vector_sum, task_vector_sum_streamed
from mergelit.methods.ties import TiesMerging, ties_merge, ties_task_vector, ties_task_vector_streamed
from mergelit.pool import ModelPool, _Checkpoint, check_checkpoint_folder

TASKS = ("cola", "mrpc", "rte", "sst2")


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key].contiguous().view(torch.int32), b[key].contiguous().view(torch.int32)), key


def small_chunks(shape, max_entries=1 << 21):
    """row_chunks cutting every tensor with more than 3 rows into about 5 pieces (the last shorter)."""
    if len(shape) == 0 or shape[0] <= 3:
        return [None]
    step = max(2, -(-shape[0] // 5))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


@pytest.fixture(params=["whole", "pieces"])
def chunking(request, monkeypatch):
    if request.param == "pieces":
        for module in (simple_average_module, task_arithmetic_module, ties_module):
            monkeypatch.setattr(module, "row_chunks", small_chunks)
    return request.param


def tiny_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=13, n_positions=7, n_embd=4, n_layer=1, n_head=2, bos_token_id=12, eos_token_id=12, pad_token_id=12
    )


def write_random_pool(root, seed: int, levels: int = 3, bare: bool = True) -> dict:
    """A pool whose weights take few values (many ties at the trim cut, many zeros in τi, exact
    cancellations): θ0 and each θi are small integers / 4."""
    generator = torch.Generator().manual_seed(seed)
    config = tiny_config()
    with torch.no_grad():
        pretrained = GPT2Model(config)
        for value in pretrained.parameters():
            value.copy_(torch.randint(-levels, levels + 1, value.shape, generator=generator) / 4)
        (pretrained if bare else _lm(pretrained, config)).save_pretrained(root / "pretrained")
        finetuned = {}
        for task in TASKS:
            model = GPT2ForSequenceClassification(config)
            model.transformer.load_state_dict(pretrained.state_dict())
            for value in model.transformer.parameters():
                keep = torch.rand(value.shape, generator=generator) < 0.5  # τi = 0 on about half the entries
                delta = torch.randint(-levels, levels + 1, value.shape, generator=generator) / 4
                value.add_(delta * keep)
            model.save_pretrained(root / task)
            finetuned[task] = str(root / task)
    return {"pretrained": str(root / "pretrained"), "finetuned": finetuned}


def _lm(body, config):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    model.transformer.load_state_dict(body.state_dict())
    return model


def make_pool(paths) -> ModelPool:
    return ModelPool(paths["pretrained"], paths["finetuned"], paths.get("tokenizer"))


# ---- the pool, tensor by tensor ------------------------------------------------------------


def test_tensors_equal_from_pretrained_state_dicts(pool_paths):
    streamed, whole = make_pool(pool_paths), make_pool(pool_paths)
    assert streamed.keys() == list(GPT2Model.from_pretrained(pool_paths["pretrained"]).state_dict())
    for key in streamed.keys():
        assert torch.equal(streamed.pretrained_tensor(key), whole.pretrained_body()[key])
        rows = slice(1, 3)
        assert torch.equal(streamed.pretrained_tensor(key, rows), whole.pretrained_body()[key][rows])
    for task in streamed.tasks:
        for key in streamed.keys():
            assert torch.equal(streamed.finetuned_tensor(task, key), whole.finetuned_body(task)[key])
        assert torch.equal(streamed.head(task), whole.head(task))
    assert not streamed._finetuned and streamed._pretrained_body is None  # no whole body was loaded


def test_check_loads_no_body(pool_paths):
    pool = make_pool(pool_paths)
    pool.check()
    assert not pool._finetuned and pool._pretrained_body is None
    assert pool.task_config("cola").pad_token_id == 50256


def test_bare_sharded_and_half_precision_checkpoints(tmp_path):
    paths = write_random_pool(tmp_path, seed=1, bare=True)
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
    for key in pool.keys():
        assert torch.equal(pool.pretrained_tensor(key), reference[key])  # bare GPT2Model: no prefix
        value = sharded.tensor("transformer." + key)
        assert value.dtype == torch.float32 and torch.equal(value, loaded[key])
        assert torch.equal(sharded.tensor("transformer." + key, slice(0, 2)), loaded[key][:2])


# ---- merges: streamed == in memory, bit for bit ---------------------------------------------


def test_streamed_merges_equal_in_memory_on_the_tiny_pool(pool_paths, chunking):
    pool, reference = make_pool(pool_paths), make_pool(pool_paths)
    theta0, bodies = reference.pretrained_body(), reference.finetuned_bodies()
    assert_bits_equal(simple_average_streamed(pool), simple_average_merge(bodies))
    assert_bits_equal(task_vector_sum_streamed(pool), task_vector_sum(theta0, bodies))
    assert_bits_equal(ties_task_vector_streamed(pool, 20, "sum"), ties_task_vector(theta0, bodies, 20, "sum"))
    assert_bits_equal(SimpleAverage(pool).merge(), simple_average_merge(bodies))
    assert_bits_equal(TaskArithmetic(pool, 0.5).merge(), task_arithmetic_merge(theta0, bodies, 0.5))
    assert_bits_equal(TiesMerging(pool, 0.6).merge(), ties_merge(theta0, bodies, 0.6))
    assert not pool._finetuned and pool._pretrained_body is None  # streamed: no whole body held


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 50, 100])
def test_streamed_ties_equals_in_memory_with_ties_and_zeros(tmp_path, seed, merge_func, threshold, chunking):
    paths = write_random_pool(tmp_path, seed=seed, bare=seed % 2 == 0)
    pool, reference = make_pool(paths), make_pool(paths)
    theta0, bodies = reference.pretrained_body(), reference.finetuned_bodies()
    assert_bits_equal(
        ties_task_vector_streamed(pool, threshold, merge_func), ties_task_vector(theta0, bodies, threshold, merge_func)
    )
    assert_bits_equal(task_vector_sum_streamed(pool), task_vector_sum(theta0, bodies))
    assert_bits_equal(simple_average_streamed(pool), simple_average_merge(bodies))


def test_both_zero_sign_fallbacks_are_exercised(tmp_path):
    # Across seeds the global majority sign Σ s comes out both positive and negative, and every pool
    # has entries whose summed sign is 0 (so the fallback matters for the bits compared above).
    fills = set()
    for seed in range(4):
        pool = make_pool(write_random_pool(tmp_path / str(seed), seed=seed))
        bodies, theta0 = pool.finetuned_bodies(), pool.pretrained_body()
        trimmed = [ties_module.trim(ties_module.flatten(b).sub_(ties_module.flatten(theta0)), 20) for b in bodies.values()]
        sign = sum(trimmed).sign()
        assert (sign == 0).any()
        fills.add(int(torch.sign(sign.sum())))
    assert fills == {-1, 1}


def test_lambda_free_part_is_reused(pool_paths):
    pool = make_pool(pool_paths)
    first = TiesMerging(pool, 0.3)
    first.merge()
    second = TiesMerging(pool, 0.6)
    second.reusable = first.reusable
    reference = make_pool(pool_paths)
    assert_bits_equal(second.merge(), ties_merge(reference.pretrained_body(), reference.finetuned_bodies(), 0.6))
    ta = TaskArithmetic(pool, 0.3)
    ta.merge()
    other = TaskArithmetic(pool, 0.7)
    other.reusable = ta.reusable
    assert_bits_equal(other.merge(), task_arithmetic_merge(reference.pretrained_body(), reference.finetuned_bodies(), 0.7))
