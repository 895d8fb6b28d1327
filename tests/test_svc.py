"""SVC (a wrapper): the spec's hand cases (spec_frontier2 §1) including the Conv1D side, the identity
case equal to Task Arithmetic bit for bit, 1-D tensors left to the base, the streamed calibration
against FusionBench's stacked form around TA and TIES, the bases it refuses, the base's data step,
the `base:` config and its overrides on the command line, and `mergelit test` with both configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch
from torch import Tensor

from conftest import body_shapes, tiny_gpt2_config, write_state_pool
from mergelit.__main__ import main
from mergelit.cli import MergeCLI
from mergelit.errors import MergelitError
from mergelit.methods import MergeMethod, SingularValueCalibration, TaskArithmetic, TiesMerging
from mergelit.methods.svc import svc_merge
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.attn.c_proj.weight"  # Conv1D [n_embd, n_embd]: square, so a pool can hold it transposed
TASKS = ("cola", "mrpc", "rte", "sst2")


def ta(scaling_factor: float) -> dict:
    return {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": scaling_factor}}


def hand_pool(root: Path, taus: list[Tensor], n_embd: int = 2, theta0: Tensor | None = None, key: str = KEY) -> ModelPool:
    """A real pool: ``key`` holds θ0 and θ0 + τ_t, every other tensor is 0 in every model."""
    config = tiny_gpt2_config(n_embd=n_embd, n_head=1)
    pretrained = {k: torch.zeros(shape) for k, shape in body_shapes(config).items()}
    if theta0 is not None:
        pretrained[key] = theta0
    finetuned = {task: {**pretrained, key: pretrained[key] + tau} for task, tau in zip(TASKS, taus)}
    return ModelPool(**write_state_pool(root, config, pretrained, finetuned))


def test_hand_case_1_disjoint_directions_are_amplified_up_to_one_over_alpha(tmp_path):
    pool = hand_pool(tmp_path, [torch.diag(torch.tensor([2.0, 0])), torch.diag(torch.tensor([0.0, 1]))])
    calibrated = SingularValueCalibration(pool, alpha=0.1, base=ta(1.0)).merge()[KEY]
    torch.testing.assert_close(calibrated, torch.diag(torch.tensor([40 / 11, 20 / 11])), rtol=0, atol=1e-6)
    unchanged = SingularValueCalibration(pool, alpha=1.0, base=ta(1.0)).merge()[KEY]
    assert torch.equal(unchanged, torch.diag(torch.tensor([2.0, 1])))


def test_hand_case_2_identical_tasks_give_that_task_whatever_lambda(tmp_path):
    tau = torch.tensor([[1.0, 2], [0.5, -1]])
    merged = SingularValueCalibration(hand_pool(tmp_path, [tau, tau]), alpha=0.1, base=ta(0.3)).merge()[KEY]
    torch.testing.assert_close(merged, tau, rtol=0, atol=1e-6)


def test_hand_case_3_the_conv1d_side(tmp_path):
    taus = [torch.tensor([[1.0, 1], [0, 0]]), torch.tensor([[0.0, 0], [1, 2]])]
    pool = hand_pool(tmp_path, taus)
    stored = SingularValueCalibration(pool, alpha=0.1, base=ta(1.0)).merge()[KEY]
    torch.testing.assert_close(stored, torch.tensor([[3.065569, -1.220146], [-1.220146, 1.845423]]), rtol=0, atol=1e-6)
    output = SingularValueCalibration(pool, alpha=0.1, projection_side="output", base=ta(1.0)).merge()[KEY]
    torch.testing.assert_close(output, torch.tensor([[1.0, 1], [1, 2]]), rtol=0, atol=1e-6)  # γ = 1: unchanged


def test_projection_side_output_is_the_input_side_of_the_transposed_conv1d(tmp_path):
    generator = torch.Generator().manual_seed(1)
    theta0 = torch.randn(4, 4, generator=generator)
    taus = [torch.randn(4, 4, generator=generator) for _ in range(3)]
    pool = hand_pool(tmp_path / "a", taus, 4, theta0)
    transposed = hand_pool(tmp_path / "b", [tau.T.contiguous() for tau in taus], 4, theta0.T.contiguous())
    output = SingularValueCalibration(pool, projection_side="output").merge()
    torch.testing.assert_close(output[KEY], SingularValueCalibration(transposed).merge()[KEY].T, rtol=0, atol=1e-6)
    assert (output[KEY] - SingularValueCalibration(pool).merge()[KEY]).abs().max() > 1e-2
    # wte has no [out, in] analogue: calibrated as stored on both sides.
    wte = hand_pool(tmp_path / "c", [torch.randn(13, 4, generator=generator) for _ in range(3)], 4, key="wte.weight")
    sides = [SingularValueCalibration(wte, projection_side=side).merge()["wte.weight"] for side in ("input", "output")]
    assert torch.equal(*sides)


def identity_pool(root: Path) -> ModelPool:
    """Each task moves one entry (i, i) of every 2-D tensor (orthogonal single directions) and some
    1-D entries; quarter values, so every float32 sum is exact."""
    config = tiny_gpt2_config()
    generator = torch.Generator().manual_seed(0)
    pretrained = {k: torch.randint(-8, 9, s, generator=generator) / 4 for k, s in body_shapes(config).items()}
    finetuned = {}
    for i, (task, value) in enumerate(zip(("cola", "mrpc", "rte"), (0.5, -1.25, 2.0))):
        body = {}
        for key, theta0 in pretrained.items():
            delta = torch.zeros_like(theta0)
            if theta0.dim() == 2:
                delta[i, i] = value
            else:
                delta = torch.randint(-2, 3, theta0.shape, generator=generator) / 4
            body[key] = theta0 + delta
        finetuned[task] = body
    return ModelPool(**write_state_pool(root, config, pretrained, finetuned))


def test_calibration_switched_off_is_task_arithmetic_bit_for_bit(tmp_path):
    """α = 1, λ = 1, one orthogonal direction per task: s = 1 on a task's own direction and 0 → α = 1 on
    the others, so γ = K / K = 1 on every direction (spec §1 test 4)."""
    pool = identity_pool(tmp_path)
    task_arithmetic = TaskArithmetic(pool, scaling_factor=1.0).merge()
    calibrated = SingularValueCalibration(pool, alpha=1.0, base=ta(1.0)).merge()
    for key in pool.keys():
        assert torch.equal(calibrated[key], task_arithmetic[key]), key


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("base_class", [TaskArithmetic, TiesMerging])
def test_streamed_calibration_equals_fusionbenchs_stacked_form(pool, base_class, side):
    """One θi at a time (the wrapper) against the K task matrices stacked and projected by einsum
    (FusionBench's accelerated function): the same bits on the fixture pool."""
    base = {"class_path": f"mergelit.methods.{base_class.__name__}", "init_args": {"scaling_factor": 0.3}}
    method = SingularValueCalibration(pool, alpha=0.1, projection_side=side, base=base)
    merged = method.merge()
    base_body = base_class(pool, scaling_factor=0.3).merge()
    reference = svc_merge(pool.pretrained_body(), pool.finetuned_bodies(), base_body, 0.1, side)
    assert list(merged) == pool.keys()
    for key, tensor in merged.items():
        assert tensor.shape == pool.body_shapes()[key] and tensor.dtype == torch.float32, key
        assert torch.equal(tensor, reference[key]), key
        if tensor.dim() != 2:
            assert torch.equal(tensor, base_body[key]), key  # LN and biases keep the base's values
    again = SingularValueCalibration(pool, alpha=0.1, projection_side=side, base=base).merge()
    assert all(torch.equal(again[key], merged[key]) for key in merged)


@pytest.mark.parametrize("base, message", [
    ({"class_path": "SimpleEnsemble"}, "merges no weights"),
    ({"class_path": "mergelit.methods.EMRMerging"}, "one body per task"),
    ({"class_path": "mergelit.methods.TallMasks"}, "one body per task"),
    ({"class_path": "Pretrained"}, "no task vectors"),
    ({"class_path": "mergelit.methods.Individual", "init_args": {"task": "cola"}}, "no task vectors"),
    ({"class_path": "os.system"}, "not a mergelit method"),
    ({"class_path": "TaskArithmetic", "init_args": {"scaling_factr": 0.3}}, "does not take"),
    ({"init_args": {"scaling_factor": 0.3}}, "method config"),
    ("TaskArithmetic", "method config"),
])
def test_bases_that_do_not_apply_are_refused(pool, base, message):
    with pytest.raises(MergelitError, match=message):
        SingularValueCalibration(pool, base=base)


class Counting(MergeMethod):
    """A data-driven stand-in: records its prepare step; merges as Task Arithmetic at λ = 1."""

    display_name = "Counting"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)
        self.prepared = []
        self.data = "train inputs"

    def prepare(self, trainer, datamodule) -> None:
        self.prepared.append((trainer, datamodule))

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0 + sum(theta - theta0 for theta in thetas)


def test_the_base_prepares_as_the_wrappers_step_and_is_built_on_its_pool(pool):
    # A callable pool -> method is what the CLI makes of a `base:` config.
    method = SingularValueCalibration(pool, base=Counting)
    assert method.base.pool is pool and method.data == "train inputs"
    method.prepare("trainer", "data")
    assert method.base.prepared == [("trainer", "data")]


def test_the_config_parses_and_base_arguments_are_overridden_on_the_command_line(fixtures_root):
    config = ["-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "svc_task_arithmetic.yaml")]
    cli = MergeCLI(args=config)
    assert isinstance(cli.model.base, TaskArithmetic) and cli.model.base.scaling_factor == 0.3
    assert cli.model.base.pool is cli.model.pool
    cli = MergeCLI(args=[*config, "--model.init_args.base.init_args.scaling_factor", "0.5"])
    assert cli.model.base.scaling_factor == 0.5
    assert cli.model.hparams["base"] == {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.5}}
    cli = MergeCLI(args=[*config, "--model.init_args.base", "TiesMerging"])
    assert isinstance(cli.model.base, TiesMerging)
    ties = MergeCLI(args=[config[0], config[1], "-c", str(CONFIGS / "methods" / "svc_ties_merging.yaml")])
    assert isinstance(ties.model.base, TiesMerging) and ties.model.base.threshold == 20
    with pytest.raises(SystemExit):  # a misspelt base argument is refused by the parser
        MergeCLI(args=[*config, "--model.init_args.base.init_args.scaling_factr", "0.5"])


def test_arguments_are_checked(pool):
    for value in (0.0, -0.1, float("nan")):
        with pytest.raises(MergelitError, match="alpha"):
            SingularValueCalibration(pool, alpha=value)
    with pytest.raises(MergelitError, match="projection_side"):
        SingularValueCalibration(pool, projection_side="left")


@pytest.mark.parametrize("name, base", [
    ("svc_task_arithmetic", {"class_path": "mergelit.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.3}}),
    ("svc_ties_merging", {"class_path": "mergelit.methods.TiesMerging", "init_args": {"scaling_factor": 0.3, "threshold": 20.0, "merge_func": "sum"}}),
])
def test_mergelit_test_runs_the_configs_and_reports_the_base(fixtures_root, tmp_path, monkeypatch, name, base):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / f"{name}.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["protocol"]["method"] == "SVC"
    assert report["protocol"]["hyperparameters"] == {"alpha": 0.1, "projection_side": "input", "base": base}
    assert 0 <= report["average"]["accuracy"] <= 1
