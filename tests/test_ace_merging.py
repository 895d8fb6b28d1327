"""ACE-Merging: the spec's hand cases (spec_frontier2 §4), k = 0 refused, the Conv1D side
(``covariance_side``) as a transposition, the per-key merge against the whole-body function and
against the rule written out plainly (lists of n task vectors, as the spec states it), a scaling
sweep's reuse, and `mergelit test` with its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import body_shapes, tiny_gpt2_config, write_state_pool
from mergelit.__main__ import main
from mergelit.errors import MergeFailed, MergelitError
from mergelit.methods import ACEMerging
from mergelit.methods.ace_merging import ace_merge
from mergelit.pool import ModelPool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = "h.0.attn.c_proj.weight"  # Conv1D [n_embd, n_embd]: square, so a pool can hold it transposed
TASKS = ("cola", "mrpc", "rte", "sst2")


def hand_pool(root: Path, n_embd: int, taus: list[torch.Tensor], theta0: torch.Tensor | None = None) -> ModelPool:
    """A real pool: ``KEY`` holds θ0 and θ0 + τ_t, every other tensor is 0 in every model."""
    config = tiny_gpt2_config(n_embd=n_embd, n_head=1)
    pretrained = {key: torch.zeros(shape) for key, shape in body_shapes(config).items()}
    if theta0 is not None:
        pretrained[KEY] = theta0
    finetuned = {task: {**pretrained, KEY: pretrained[KEY] + tau} for task, tau in zip(TASKS, taus)}
    return ModelPool(**write_state_pool(root, config, pretrained, finetuned))


def test_hand_case_1_the_row_prior_without_refinement(tmp_path):
    taus = [torch.tensor([[1.0, 0], [-1, 0]]), torch.tensor([[0.0, 1], [0, -1]])]
    method = ACEMerging(hand_pool(tmp_path, 2, taus))
    torch.testing.assert_close(method.merge()[KEY], torch.tensor([[0.5, 0.5], [-0.5, -0.5]]), rtol=0, atol=1e-7)
    assert method.heterogeneity[KEY] == 0  # tr = (2, 2): no flag


def test_hand_case_2_the_refinement_path(tmp_path):
    taus = [torch.diag(torch.tensor([1.0, 1, 0, 0])), torch.diag(torch.tensor([0.0, 0, 3, 3]))]
    method = ACEMerging(hand_pool(tmp_path, 4, taus))
    expected = torch.tensor([
        [0.770555, -0.228346, -0.713678, -0.713678],
        [-0.228346, 0.770555, -0.713678, -0.713678],
        [-0.271104, -0.271104, 4.178453, -2.751096],
        [-0.271104, -0.271104, -2.751096, 4.178453],
    ])
    torch.testing.assert_close(method.merge()[KEY], expected, rtol=0, atol=2e-6)
    assert method.heterogeneity[KEY] == pytest.approx(0.75190, abs=1e-5)  # > 0.3: refined, k = int(4 · 0.3) = 1


def test_hand_case_3_one_task_is_not_that_task(tmp_path):
    method = ACEMerging(hand_pool(tmp_path, 2, [torch.tensor([[1.0, 0], [-1, 0]])]))
    torch.testing.assert_close(method.merge()[KEY], torch.tensor([[2.01 / 3.01, 0], [-2.01 / 3.01, 0]]), rtol=0, atol=1e-7)
    assert method.heterogeneity[KEY] != method.heterogeneity[KEY]  # NaN: the variance of one value


def test_a_refined_tensor_with_no_direction_is_refused_naming_it(tmp_path):
    # tr = (1, 9): γ = 2.0 > 0.3, refined with k = int(2 · 0.3) = 0 singular values: NaN in the official code.
    pool = hand_pool(tmp_path, 2, [torch.diag(torch.tensor([1.0, 0])), torch.diag(torch.tensor([0.0, 3]))])
    with pytest.raises(MergeFailed, match=KEY.replace(".", r"\.")):
        ACEMerging(pool).merge()
    ACEMerging(pool, heterogeneity_threshold=2.5).merge()  # unflagged: no refinement, no k


def test_a_zero_task_vector_in_a_refined_tensor_is_named(tmp_path):
    # A zero τ has log(0 + 1e-12) among the log traces (refined) and a zero centred trace: ridge ε / 1e-12.
    generator = torch.Generator().manual_seed(2)
    pool = hand_pool(tmp_path, 4, [torch.randn(4, 4, generator=generator), torch.zeros(4, 4), torch.randn(4, 4, generator=generator)])
    with pytest.warns(UserWarning, match=r"task mrpc's update of 'h\.0\.attn\.c_proj\.weight' is zero"):
        merged = ACEMerging(pool).merge()
    assert torch.isfinite(merged[KEY]).all()


def test_covariance_side_input_is_stored_on_the_transposed_conv1d(tmp_path):
    generator = torch.Generator().manual_seed(0)
    theta0 = torch.randn(4, 4, generator=generator)
    taus = [torch.randn(4, 4, generator=generator) * scale for scale in (0.1, 0.5, 2.0)]  # heterogeneous: refined
    pool = hand_pool(tmp_path / "a", 4, taus, theta0)
    transposed = hand_pool(tmp_path / "b", 4, [tau.T.contiguous() for tau in taus], theta0.T.contiguous())
    method = ACEMerging(pool, covariance_side="input")
    as_input = method.merge()
    assert method.heterogeneity[KEY] > 0.3
    torch.testing.assert_close(as_input[KEY], ACEMerging(transposed).merge()[KEY].T, rtol=0, atol=1e-6)
    stored = ACEMerging(pool).merge()
    assert (as_input[KEY] - stored[KEY]).abs().max() > 1e-2  # not transpose-equivariant: the sides differ


def spec_rule(taus: list[torch.Tensor], eps: float = 0.01, k_frac: float = 0.3, threshold: float = 0.3) -> torch.Tensor:
    """§4 of the spec written out with every task vector and covariance in a list (float64): what the
    streamed implementation must compute."""
    n = len(taus)
    traces = torch.stack([torch.trace(tau.T @ tau) for tau in taus])
    logs = torch.log(traces + 1e-12)
    flag = bool(torch.var(logs) / (logs.mean() ** 2 + 1e-12) > threshold)
    covariances, weighted, grams = [], 0, 0
    for tau in taus:
        centred = tau - tau.mean(dim=0, keepdim=True)
        raw = centred.T @ centred
        trace = torch.trace(raw) + 1e-12
        covariance, ridge = (raw / trace, eps / trace) if flag else (raw, eps)
        covariances.append(covariance)
        regularised = covariance + ridge * torch.eye(raw.shape[0], dtype=raw.dtype)
        weighted = weighted + centred @ regularised
        grams = grams + regularised
    prior = sum(covariances).mean(dim=0, keepdim=True)
    if flag:
        prior = prior / (traces.mean() + 1e-12)
    merged = weighted @ torch.linalg.inv(grams + prior)
    if not flag:
        return merged
    residual = sum(tau @ (covariance - grams / n) for tau, covariance in zip(taus, covariances))
    U, S, Vh = torch.linalg.svd(residual + merged, full_matrices=False)
    k = int(S.numel() * k_frac)
    return merged + S[:k].mean() * U[:, :k] @ Vh[:k]


@pytest.fixture(scope="module")
def pool(pool_paths) -> ModelPool:
    return ModelPool(**pool_paths)


@pytest.fixture(scope="module")
def merged(pool) -> tuple[ACEMerging, dict[str, torch.Tensor]]:
    method = ACEMerging(pool)
    return method, method.merge()


def test_per_key_merge_equals_the_whole_body_function_and_the_plain_rule(pool, merged):
    method, state = merged
    reference = ace_merge(pool.pretrained_body(), pool.finetuned_bodies())
    assert list(state) == pool.keys()
    flagged = [key for key, gamma in method.heterogeneity.items() if gamma > 0.3]
    assert flagged and len(flagged) < len(method.heterogeneity) == 10  # both paths are exercised
    for key, tensor in state.items():
        assert tensor.shape == pool.body_shapes()[key] and tensor.dtype == torch.float32, key
        assert torch.equal(tensor, reference[key]), key
        theta0, thetas = pool.pretrained_tensor(key), pool.finetuned_tensors(key)
        taus = [(theta - theta0).double() for theta in thetas]
        if tensor.dim() == 2:
            rule = spec_rule(taus)
            torch.testing.assert_close((tensor - theta0).double(), rule, rtol=0, atol=1e-6 * float(rule.abs().max()) + 1e-7)
        else:  # 1-D: θ0 + mean τi
            torch.testing.assert_close(tensor, theta0 + (sum(taus) / len(taus)).float(), rtol=0, atol=1e-7)


def test_deterministic_and_scaling_zero_is_theta0(pool, merged):
    _, state = merged
    again = ACEMerging(pool).merge()
    assert all(torch.equal(again[key], state[key]) for key in state)
    for key, tensor in ACEMerging(pool, scaling_factor=0.0).merge().items():
        assert torch.equal(tensor, pool.pretrained_tensor(key)), key


def test_a_scaling_sweep_computes_tau_m_once(pool, merged):
    _, state = merged
    pool.keep_reused(True)
    try:
        first, second = ACEMerging(pool), ACEMerging(pool, scaling_factor=0.5)
        at_one, at_half = first.merge(), second.merge()
        assert first.heterogeneity and not second.heterogeneity  # the second point reused τm
    finally:
        pool.keep_reused(False)
    fresh = ACEMerging(pool, scaling_factor=0.5).merge()
    for key in state:
        assert torch.equal(at_one[key], state[key]) and torch.equal(at_half[key], fresh[key]), key


def test_arguments_are_checked(pool):
    for name, value in [("eps", -1.0), ("k_frac", 1.5), ("heterogeneity_threshold", float("nan")), ("scaling_factor", float("inf"))]:
        with pytest.raises(MergelitError, match=name):
            ACEMerging(pool, **{name: value})
    with pytest.raises(MergelitError, match="covariance_side"):
        ACEMerging(pool, covariance_side="output")


def test_mergelit_test_runs_the_config(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "report.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "ace_merging.yaml"),
          "--trainer.enable_progress_bar", "false", "--report_save_path", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["protocol"]["method"] == "ACE-Merging"
    assert report["protocol"]["hyperparameters"] == {
        "scaling_factor": 1.0, "eps": 0.01, "k_frac": 0.3, "heterogeneity_threshold": 0.3, "covariance_side": "stored"}
    assert 0 <= report["average"]["accuracy"] <= 1
