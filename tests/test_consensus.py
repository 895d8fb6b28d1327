"""Consensus Merging: the spec's hand case (spec_frontier2 §3), its limits k = 0 (Task Arithmetic) and
k = n + 1 (θ0), the paper's mask rule where FusionBench's differs, the per-key merge against the
whole-body function around both bases, an α sweep's reuse, and `mergelit test` with its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import body_shapes, tiny_gpt2_config, write_state_pool
from mergelit.__main__ import main
from mergelit.errors import MergelitError
from mergelit.methods import ConsensusMerging, TaskArithmetic, TiesMerging
from mergelit.methods.consensus import consensus_merge, tall_mask, task_vector_sum
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.ln_1.weight"  # a [4] tensor of the 4-wide GPT-2: the hand vectors
CONFIG = tiny_gpt2_config(n_embd=4)
# The spec's hand case: n = 3, λ = 0.6.
TAUS = {"cola": [1, 0.5, 0, 0.2], "mrpc": [1, -0.5, 0.3, 0.2], "rte": [-1, 0.1, 0, 1]}
MASKS = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]]  # m1, m2, m3; counts [2, 3, 1, 1]


def hand_pool(root: Path, theta0: float = 0.0, taus: dict[str, list[float]] = TAUS) -> ModelPool:
    """A real pool: ``KEY`` holds θ0 and θ0 + τ_task, every other tensor is 0 in every model."""
    shapes = body_shapes(CONFIG)
    pretrained = {key: torch.zeros(shape) for key, shape in shapes.items()}
    pretrained[KEY] = torch.full((4,), theta0)
    finetuned = {task: {**pretrained, KEY: pretrained[KEY] + torch.tensor(tau)} for task, tau in taus.items()}
    return ModelPool(**write_state_pool(root, CONFIG, pretrained, finetuned))


def test_hand_case(tmp_path):
    pool = hand_pool(tmp_path)
    method = ConsensusMerging(pool, scaling_factor=0.3, tall_mask_lambda=0.6, min_agreement=2)
    merged = method.merge()[KEY]
    torch.testing.assert_close(merged, torch.tensor([0.3, 0.03, 0.0, 0.0]), rtol=0, atol=1e-7)
    assert merged[2] == 0 and merged[3] == 0  # counts 1: dropped exactly
    assert method.kept[KEY] == (2, 4)
    # Task Arithmetic at α = 0.3 for comparison: k = 0 keeps everything.
    everything = ConsensusMerging(pool, scaling_factor=0.3, min_agreement=0).merge()[KEY]
    torch.testing.assert_close(everything, torch.tensor([0.3, 0.03, 0.09, 0.42]), rtol=0, atol=1e-7)


def test_masks_are_the_papers_rule_where_fusionbenchs_mask_function_is_all_ones(tmp_path):
    """θ0 = 10 everywhere: |θ0 − θt| = |τt| gives the hand masks; FusionBench's |θ0 − τt| would give all ones."""
    pool = hand_pool(tmp_path, theta0=10.0)
    theta0, thetas = pool.pretrained_tensor(KEY), pool.finetuned_tensors(KEY)
    summed = task_vector_sum(theta0, thetas)
    scale = torch.tensor(0.6)
    masks = [tall_mask(theta0, theta, theta0 + summed, scale).int().tolist() for theta in thetas]
    assert masks == MASKS
    fusionbench = [((theta0 - (theta - theta0)).abs() > (summed - (theta - theta0)).abs() * scale).int().tolist() for theta in thetas]
    assert fusionbench == [[1, 1, 1, 1]] * 3
    merged = ConsensusMerging(pool, scaling_factor=0.3).merge()[KEY]
    assert torch.equal(merged[2:], theta0[2:]) and not torch.equal(merged[:2], theta0[:2])


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


def test_k_zero_is_task_arithmetic_and_k_above_n_is_theta0_bit_for_bit(pool):
    task_arithmetic = TaskArithmetic(pool, scaling_factor=0.3).merge()
    everything = ConsensusMerging(pool, scaling_factor=0.3, min_agreement=0).merge()
    nothing = ConsensusMerging(pool, scaling_factor=0.3, min_agreement=len(pool.tasks) + 1).merge()
    for key in pool.keys():
        assert torch.equal(everything[key], task_arithmetic[key]), key
        assert torch.equal(nothing[key], pool.pretrained_tensor(key)), key


def test_k_zero_around_ties_is_ties(pool):
    ties = TiesMerging(pool, scaling_factor=0.3, threshold=20, merge_func="sum").merge()
    everything = ConsensusMerging(pool, scaling_factor=0.3, min_agreement=0, base="ties").merge()
    assert all(torch.equal(everything[key], ties[key]) for key in pool.keys())


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_per_key_merge_equals_the_whole_body_function(pool, base):
    method = ConsensusMerging(pool, scaling_factor=0.3, tall_mask_lambda=0.6, min_agreement=2, base=base)
    merged = method.merge()
    reference = consensus_merge(pool.pretrained_body(), pool.finetuned_bodies(), 0.3, 0.6, 2, base)
    assert list(merged) == pool.keys()
    for key, tensor in merged.items():
        assert tensor.shape == pool.body_shapes()[key] and tensor.dtype == torch.float32, key
        assert torch.equal(tensor, reference[key]), key
    kept = sum(k for k, _ in method.kept.values()) / sum(n for _, n in method.kept.values())
    assert 0 < kept < 1
    again = ConsensusMerging(pool, scaling_factor=0.3, base=base).merge()
    assert all(torch.equal(again[key], merged[key]) for key in merged)


def test_an_alpha_sweep_reuses_the_kept_vector_and_gives_the_same_bits(pool):
    fresh = {alpha: ConsensusMerging(pool, scaling_factor=alpha).merge() for alpha in (0.2, 0.7)}
    pool.keep_reused(True)
    try:
        first = ConsensusMerging(pool, scaling_factor=0.2)
        swept = {0.2: first.merge()}
        second = ConsensusMerging(pool, scaling_factor=0.7)
        swept[0.7] = second.merge()
        assert first.kept and not second.kept  # the second point computed no mask
    finally:
        pool.keep_reused(False)
    for alpha in fresh:
        assert all(torch.equal(swept[alpha][key], fresh[alpha][key]) for key in fresh[alpha])


def test_arguments_are_checked(pool):
    with pytest.raises(MergelitError, match="min_agreement"):
        ConsensusMerging(pool, min_agreement=-1)
    with pytest.raises(MergelitError, match="min_agreement"):
        ConsensusMerging(pool, min_agreement=1.5)
    with pytest.raises(MergelitError, match="tall_mask_lambda"):
        ConsensusMerging(pool, tall_mask_lambda=-0.1)
    with pytest.raises(MergelitError, match="base"):
        ConsensusMerging(pool, base="dare")


def test_mergelit_test_runs_the_config(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "consensus_ta.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["protocol"]["method"] == "Consensus Merging"
    assert report["protocol"]["hyperparameters"] == {
        "scaling_factor": 0.3, "tall_mask_lambda": 0.6, "min_agreement": 2, "base": "task_arithmetic"}
    assert 0 <= report["average"]["accuracy"] <= 1
