"""MagMax: the spec's hand cases (spec_frontier2 §2), the per-key merge against the whole-body function,
identical bodies, determinism, a λ sweep's reuse, and `mergelit test` with its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import body_shapes, tiny_gpt2_config, write_integer_pool, write_state_pool
from mergelit.__main__ import main
from mergelit.errors import MergelitError
from mergelit.methods import MagMax
from mergelit.methods.magmax import magmax_merge
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.ln_1.weight"  # a [4] tensor of the 4-wide GPT-2: the hand vectors
CONFIG = tiny_gpt2_config(n_embd=4)
CONFIG_OF_INTEGER_POOL = tiny_gpt2_config()  # write_integer_pool's


def hand_pool(root: Path, theta0: torch.Tensor | float, taus: dict[str, list[float]]) -> ModelPool:
    """A real pool: ``KEY`` holds θ0 and θ0 + τ_task, every other tensor is θ0 = 0 in every model."""
    shapes = body_shapes(CONFIG)
    pretrained = {key: torch.zeros(shape) for key, shape in shapes.items()}
    pretrained[KEY] = torch.full((4,), float(theta0)) if not isinstance(theta0, torch.Tensor) else theta0
    finetuned = {task: {**pretrained, KEY: pretrained[KEY] + torch.tensor(tau)} for task, tau in taus.items()}
    return ModelPool(**write_state_pool(root, CONFIG, pretrained, finetuned))


def test_hand_case_ties_go_to_the_later_task(tmp_path):
    tau1, tau2 = [1, -3, 2, 0], [-2, 3, 1, 0]
    merged = MagMax(hand_pool(tmp_path / "a", 0, {"cola": tau1, "mrpc": tau2}), scaling_factor=0.5).merge()
    assert torch.equal(merged[KEY], torch.tensor([-1, 1.5, 1, 0]))  # the tie −3 / 3 goes to task 2
    reversed_order = MagMax(hand_pool(tmp_path / "b", 0, {"cola": tau2, "mrpc": tau1}), scaling_factor=0.5).merge()
    assert torch.equal(reversed_order[KEY], torch.tensor([-1, -1.5, 1, 0]))


def test_one_task_is_theta0_plus_lambda_tau_and_lambda_zero_is_theta0(tmp_path):
    theta0 = torch.tensor([0.25, -1.5, 2.0, 0.75])
    pool = hand_pool(tmp_path, theta0, {"cola": [1, -3, 2, 0]})
    assert torch.equal(MagMax(pool, scaling_factor=0.5).merge()[KEY], theta0 + 0.5 * torch.tensor([1.0, -3, 2, 0]))
    pool = hand_pool(tmp_path / "two", theta0, {"cola": [1, -3, 2, 0], "rte": [0.5, 2, -4, 1]})
    for key, tensor in MagMax(pool, scaling_factor=0.0).merge().items():
        assert torch.equal(tensor, pool.pretrained_tensor(key)), key


def test_identical_bodies_at_lambda_one_give_that_body(tmp_path):
    # Quarter-valued weights: θ0 + (θ − θ0) is exact in float32.
    one = ModelPool(**write_integer_pool(tmp_path / "one", seed=3, tasks=("cola",)))
    body = one.finetuned_body("cola")
    same = ModelPool(**write_state_pool(tmp_path / "same", CONFIG_OF_INTEGER_POOL, one.pretrained_body(), dict.fromkeys(("cola", "mrpc", "rte"), body)))
    for key, tensor in MagMax(same, scaling_factor=1.0).merge().items():
        assert torch.equal(tensor, body[key]), key


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


def test_per_key_merge_equals_the_whole_body_function_and_keeps_keys_shapes_dtypes(pool):
    merged = MagMax(pool, scaling_factor=0.5).merge()
    reference = magmax_merge(pool.pretrained_body(), pool.finetuned_bodies(), 0.5)
    assert list(merged) == pool.keys()
    for key, tensor in merged.items():
        assert tensor.shape == pool.body_shapes()[key] and tensor.dtype == torch.float32, key
        assert torch.equal(tensor, reference[key]), key
    again = MagMax(pool, scaling_factor=0.5).merge()
    assert all(torch.equal(again[key], merged[key]) for key in merged)


def test_a_lambda_sweep_selects_tau_max_once_and_gives_the_same_bits(pool):
    fresh = {scale: MagMax(pool, scaling_factor=scale).merge() for scale in (0.3, 0.8)}
    pool.keep_reused(True)
    try:
        swept = {scale: MagMax(pool, scaling_factor=scale).merge() for scale in (0.3, 0.8)}
        assert len(pool._reused) == 1  # one group: τmax, kept from the first point
    finally:
        pool.keep_reused(False)
    for scale in fresh:
        assert all(torch.equal(swept[scale][key], fresh[scale][key]) for key in fresh[scale])


def test_arguments_are_checked(pool):
    with pytest.raises(MergelitError, match="scaling_factor"):
        MagMax(pool, scaling_factor=float("nan"))
    with pytest.raises(MergelitError, match="scaling_factor"):
        MagMax(pool, scaling_factor="0.5")


def test_mergelit_test_runs_the_config(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "magmax.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["protocol"]["method"] == "MagMax"
    assert report["protocol"]["hyperparameters"] == {"scaling_factor": 0.5}
    assert 0 <= report["average"]["accuracy"] <= 1
