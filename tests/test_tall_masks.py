"""TALL masks (task-aware): the spec's hand bodies (spec_frontier2 §3), the paper's rule where
FusionBench's differs, the streamed bodies against the whole-body function, one body in memory at a
time, bit-packed masks, one task = that task's body, and `mergelit test` with its config (reported
task-aware)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import body_shapes, tiny_gpt2_config, write_integer_pool, write_state_pool
from mergelit.__main__ import main
from mergelit.errors import KeyMissing, MergelitError
from mergelit.methods import TallMasks
from mergelit.methods.tall_masks import tall_mask_bodies
from mergelit.state_dict import pack_bits, unpack_bits
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.ln_1.weight"  # a [4] tensor of the 4-wide GPT-2: the hand vectors
CONFIG = tiny_gpt2_config(n_embd=4)
TAUS = {"cola": [1, 0.5, 0, 0.2], "mrpc": [1, -0.5, 0.3, 0.2], "rte": [-1, 0.1, 0, 1]}  # S = [1, 0.1, 0.3, 1.4]
BODIES = {"cola": [1, 0.1, 0, 0], "mrpc": [1, 0.1, 0.3, 0], "rte": [0, 0.1, 0, 1.4]}  # θ0 + m_t ⊙ S at λ = 0.6


def hand_pool(root: Path, theta0: float = 0.0) -> ModelPool:
    """A real pool: ``KEY`` holds θ0 and θ0 + τ_task, every other tensor is 0 in every model."""
    shapes = body_shapes(CONFIG)
    pretrained = {key: torch.zeros(shape) for key, shape in shapes.items()}
    pretrained[KEY] = torch.full((4,), theta0)
    finetuned = {task: {**pretrained, KEY: pretrained[KEY] + torch.tensor(tau)} for task, tau in TAUS.items()}
    return ModelPool(**write_state_pool(root, CONFIG, pretrained, finetuned))


def test_hand_bodies(tmp_path):
    method = TallMasks(hand_pool(tmp_path), tall_mask_lambda=0.6)
    for task, expected in BODIES.items():
        body = method.body_for(task).state_dict()[KEY]
        torch.testing.assert_close(body, torch.tensor(expected), rtol=0, atol=1e-7)
        assert all(body[i] == 0 for i, value in enumerate(expected) if value == 0), task  # masked out exactly
    assert method.mask_density["cola"] == 2 / sum(math.prod(s) for s in body_shapes(CONFIG).values())


def test_masks_follow_the_paper_when_theta0_is_large(tmp_path):
    """θ0 = 10: the paper's |θ0 − θt| = |τt| still gives the hand masks (FusionBench's |θ0 − τt| would
    keep every entry, making every body θ0 + S)."""
    method = TallMasks(hand_pool(tmp_path, theta0=10.0), tall_mask_lambda=0.6)
    method.prepare_merge()
    _, masks = method._parts
    expected = {"cola": [1, 1, 0, 0], "mrpc": [1, 1, 1, 0], "rte": [0, 1, 0, 1]}
    for task, mask in expected.items():
        assert unpack_bits(masks[task][KEY], (4,)).int().tolist() == mask, task


def test_one_task_gives_that_tasks_body(tmp_path):
    # One task: S = τ1, and m = |τ1| > λ·0 holds every changed entry: θ0 + τ1 = θ1 (exact on quarters).
    pool = ModelPool(**write_integer_pool(tmp_path, seed=5, tasks=("sst2",)))
    body = TallMasks(pool).body_for("sst2").state_dict()
    for key, tensor in pool.finetuned_body("sst2").items():
        assert torch.equal(body[key], tensor), key


def test_bit_packing_round_trips():
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(33 / 8)
    assert torch.equal(unpack_bits(packed, (3, 11)), mask)


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


def test_streamed_bodies_equal_the_whole_body_function_one_body_at_a_time(pool):
    reference = tall_mask_bodies(pool.pretrained_body(), pool.finetuned_bodies(), 0.6)
    method = TallMasks(pool, tall_mask_lambda=0.6)
    again = TallMasks(pool, tall_mask_lambda=0.6)
    for task in pool.tasks:
        body = method.body_for(task)
        assert method.body_for(task) is body  # kept while the same task is scored
        state = body.state_dict()
        assert list(state) == pool.keys()
        for key, tensor in state.items():
            assert tensor.dtype == torch.float32 and tensor.shape == pool.body_shapes()[key], key
            assert torch.equal(tensor, reference[task][key]), (task, key)
        assert all(torch.equal(again.body_for(task).state_dict()[key], state[key]) for key in state)
    _, masks = method._parts
    first = pool.keys()[0]
    assert masks[pool.tasks[0]][first].dtype == torch.uint8
    assert masks[pool.tasks[0]][first].numel() == math.ceil(pool.body_shapes()[first].numel() / 8)
    assert 0 < min(method.mask_density.values()) and max(method.mask_density.values()) < 1


def test_task_aware_and_what_it_keeps(pool):
    method = TallMasks(pool)
    assert method.kind == "task-aware"
    assert method.bodies_at_inference() == 2 + len(pool.tasks) / 32
    with pytest.raises(NotImplementedError, match="body_for"):
        method.merge()
    with pytest.raises(KeyMissing, match="wnli"):
        method.body_for("wnli")


def test_larger_lambda_gives_sparser_masks(pool):
    dense, sparse = TallMasks(pool, tall_mask_lambda=0.2), TallMasks(pool, tall_mask_lambda=0.6)
    dense.prepare_merge(), sparse.prepare_merge()
    assert all(sparse.mask_density[task] <= dense.mask_density[task] for task in pool.tasks)


def test_arguments_are_checked(pool):
    with pytest.raises(MergelitError, match="tall_mask_lambda"):
        TallMasks(pool, tall_mask_lambda=float("inf"))
    with pytest.raises(MergelitError, match="tall_mask_lambda"):
        TallMasks(pool, tall_mask_lambda=-1.0)


def test_mergelit_test_runs_the_config_task_aware(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "tall_mask_ta.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    protocol = report["protocol"]
    assert protocol["method"] == "TALL masks" and protocol["kind"] == "task-aware"
    assert protocol["hyperparameters"] == {"tall_mask_lambda": 0.6}
    assert protocol["bodies_at_inference"] == 2 + 7 / 32
    assert protocol["costs"]["merge_seconds"] is not None
    assert 0 <= report["average"]["accuracy"] <= 1
