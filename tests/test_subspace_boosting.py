"""Subspace Boosting (a wrapper): the spec's hand cases (spec_frontier2 §5), homogeneity and transposition,
c_attn boosted per q/k/v, the zero update kept with a warning, β = 1 around Task Arithmetic equal to it
bit for bit, the targets, the wrapper against the whole-body function around TA and TIES, the `base:`
overrides, and `mergelit test` with both configs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import body_shapes, tiny_gpt2_config, write_state_pool
from mergelit.__main__ import main
from mergelit.cli import MergeCLI
from mergelit.errors import MergelitError
from mergelit.methods import SubspaceBoosting, TaskArithmetic, TiesMerging
from mergelit.methods.subspace_boosting import boost_plan, subspace_boost, subspace_boosting_merge
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.attn.c_proj.weight"  # Conv1D [4, 4] of the 4-wide GPT-2
C_ATTN = "h.0.attn.c_attn.weight"  # Conv1D [4, 12]: q, k, v = columns 0-3, 4-7, 8-11
CONFIG = tiny_gpt2_config(n_embd=4)


def ta(scaling_factor: float) -> dict:
    return {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": scaling_factor}}


def hand_pool(root: Path, updates: dict[str, Tensor]) -> ModelPool:
    """A real pool of one task (cola) whose task vector is ``updates`` on their keys and 0 elsewhere; θ0 = 0."""
    pretrained = {key: torch.zeros(shape) for key, shape in body_shapes(CONFIG).items()}
    finetuned = {"cola": {**pretrained, **updates}}
    return ModelPool(**write_state_pool(root, CONFIG, pretrained, finetuned))


@pytest.mark.parametrize("beta, expected", [(0.01, [4, 4, 4, 4]), (0.6, [4, 2, 2, 2]), (1.0, [4, 2, 1, 1])])
def test_hand_case_spectrum(beta, expected):
    # Ratios 0.5, 0.75, 0.875, 1: the cutoff is the first index whose ratio reaches β.
    matrix = torch.diag(torch.tensor([4.0, 2, 1, 1], dtype=torch.float64))
    boosted, _ = subspace_boost(matrix, beta)
    torch.testing.assert_close(boosted, torch.diag(torch.tensor(expected, dtype=torch.float64)), rtol=0, atol=1e-12)


def test_hand_case_through_the_wrapper_and_lambda_zero_is_theta0(tmp_path):
    pool = hand_pool(tmp_path, {KEY: torch.diag(torch.tensor([4.0, 2, 1, 1]))})
    with pytest.warns(UserWarning, match="is zero"):  # the other Conv1D updates of this pool are 0
        boosted = SubspaceBoosting(pool, beta=0.01, base=ta(1.0)).merge()
    torch.testing.assert_close(boosted[KEY], 4 * torch.eye(4), rtol=0, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nothing = SubspaceBoosting(pool, base=ta(0.0)).merge()
    zero = [str(w.message) for w in caught if "is zero" in str(w.message)]
    assert len(zero) == 6 and any(KEY in message for message in zero)  # c_attn's q, k, v, c_proj, c_fc, mlp.c_proj
    assert all(torch.equal(nothing[key], pool.pretrained_tensor(key)) for key in pool.keys())


def test_a_zero_update_is_kept_with_a_warning_naming_it():
    with pytest.warns(UserWarning, match="h.0.mlp.c_fc.weight"):
        from mergelit.methods.subspace_boosting import boost_tensor

        update = torch.zeros(4, 16, dtype=torch.float64)
        boosted, cutoffs = boost_tensor("h.0.mlp.c_fc.weight", update, (1, 16, 0.01))
    assert boosted is update and cutoffs == [3]  # no cutoff (NaN ratios): the last index


def test_homogeneous_and_transpose_equivariant():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    boosted, cutoff = subspace_boost(matrix, 0.5)
    assert cutoff > 0
    torch.testing.assert_close(subspace_boost(-2.5 * matrix, 0.5)[0], -2.5 * boosted, rtol=0, atol=1e-12)
    torch.testing.assert_close(subspace_boost(matrix.T, 0.5)[0], boosted.T, rtol=0, atol=1e-12)


def test_c_attn_is_boosted_per_q_k_v_block(tmp_path):
    generator = torch.Generator().manual_seed(1)
    update = torch.randn(4, 12, generator=generator)
    pool = hand_pool(tmp_path, {C_ATTN: update})
    with pytest.warns(UserWarning):
        boosted = SubspaceBoosting(pool, beta=0.01, base=ta(1.0)).merge()[C_ATTN]
    blocks = [subspace_boost(block, 0.01)[0] for block in update.double().split(4, dim=1)]
    torch.testing.assert_close(boosted, torch.cat(blocks, dim=1).float(), rtol=0, atol=1e-6)
    whole, _ = subspace_boost(update.double(), 0.01)
    assert (boosted - whole.float()).abs().max() > 1e-2
    assert boost_plan(C_ATTN, (768, 2304), "conv1d", 0.01, 0.02) == (1, 768, 0.02)  # attn_beta for q, k, v


def test_targets():
    conv1d = [key for key in body_shapes(CONFIG) if boost_plan(key, body_shapes(CONFIG)[key], "conv1d", 0.01, 0.01)]
    branch = [key for key in body_shapes(CONFIG) if boost_plan(key, body_shapes(CONFIG)[key], "fusionbench_branch", 0.01, 0.01)]
    assert conv1d == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]
    assert branch == ["h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]  # c_attn is skipped
    assert boost_plan("blocks.0.attn.in_proj_weight", (2304, 768), "fusionbench_branch", 0.01, 0.02) == (0, 768, 0.02)


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


def test_beta_one_around_task_arithmetic_is_task_arithmetic_bit_for_bit(pool):
    task_arithmetic = TaskArithmetic(pool, scaling_factor=0.3).merge()
    method = SubspaceBoosting(pool, beta=1.0, base=ta(0.3))
    boosted = method.merge()
    assert all(torch.equal(boosted[key], task_arithmetic[key]) for key in pool.keys())
    assert len(method.cutoffs) == 8 and all(c > 0 for values in method.cutoffs.values() for c in values)


@pytest.mark.parametrize("targets", ["conv1d", "fusionbench_branch"])
@pytest.mark.parametrize("base_class", [TaskArithmetic, TiesMerging])
def test_wrapper_equals_the_whole_body_function(pool, base_class, targets):
    base = {"class_path": f"mergelit.methods.{base_class.__name__}", "init_args": {"scaling_factor": 1.0}}
    method = SubspaceBoosting(pool, beta=0.01, targets=targets, base=base)
    merged = method.merge()
    base_body = base_class(pool, scaling_factor=1.0).merge()
    reference = subspace_boosting_merge(pool.pretrained_body(), base_body, 0.01, None, targets)
    assert list(merged) == pool.keys()
    for key, tensor in merged.items():
        assert tensor.shape == pool.body_shapes()[key] and tensor.dtype == torch.float32, key
        assert torch.equal(tensor, reference[key]), key
        if boost_plan(key, tensor.shape, targets, 0.01, 0.01) is None:
            assert torch.equal(tensor, base_body[key]), key  # keys outside the targets are the base's
        else:
            assert not torch.equal(tensor, base_body[key]), key
    again = SubspaceBoosting(pool, beta=0.01, targets=targets, base=base).merge()
    assert all(torch.equal(again[key], merged[key]) for key in merged)


def test_arguments_are_checked(pool):
    for name, value in [("beta", 1.5), ("beta", float("nan")), ("attn_beta", -0.1)]:
        with pytest.raises(MergelitError, match=name):
            SubspaceBoosting(pool, **{name: value})
    with pytest.raises(MergelitError, match="targets"):
        SubspaceBoosting(pool, targets="all")
    with pytest.raises(MergelitError, match="one body per task"):
        SubspaceBoosting(pool, base={"class_path": "EMRMerging"})


def test_base_arguments_are_overridden_on_the_command_line(fixtures_root):
    config = ["-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "subspace_boosting_ties.yaml")]
    cli = MergeCLI(args=[*config, "--model.init_args.base.init_args.scaling_factor", "0.3", "--model.init_args.attn_beta", "0.02"])
    assert isinstance(cli.model.base, TiesMerging) and cli.model.base.scaling_factor == 0.3 and cli.model.base.threshold == 20
    assert cli.model.attn_beta == 0.02 and cli.model.beta == 0.01


@pytest.mark.parametrize("name, base", [
    ("subspace_boosting_ta", {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 1.0}}),
    ("subspace_boosting_ties", {"class_path": "mergelit.methods.TiesMerging", "init_args": {"scaling_factor": 1.0, "threshold": 20.0, "merge_func": "sum"}}),
])
def test_mergelit_test_runs_the_configs_and_reports_the_base(fixtures_root, tmp_path, monkeypatch, name, base):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / f"{name}.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["protocol"]["method"] == "Subspace Boosting"
    assert report["protocol"]["hyperparameters"] == {"beta": 0.01, "attn_beta": None, "targets": "conv1d", "base": base}
    assert 0 <= report["average"]["accuracy"] <= 1
