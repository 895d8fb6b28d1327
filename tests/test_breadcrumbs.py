"""Model Breadcrumbs: the spec's hand-checkable cases, the stable-sort reference, layout, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelit.errors import MergelitError
from mergelit.methods.breadcrumbs import (
    Breadcrumbs,
    breadcrumbs_merge,
    breadcrumbs_tensor,
    mask_magnitude_outliers,
    mask_magnitude_outliers_per_row,
)
from mergelit.methods.task_arithmetic import task_arithmetic_merge
from mergelit.pool import ModelPool

SHAPES = {
    "wte.weight": (11, 4),
    "wpe.weight": (6, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
    "h.0.mlp.c_fc.weight": (4, 16),
    "h.0.mlp.c_proj.weight": (16, 4),
    "ln_f.weight": (4,),
}


def body(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=g) for key, shape in SHAPES.items()}


def tiny_bodies() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    pretrained = body(0)
    finetuned = {
        task: {k: v + d for (k, v), d in zip(pretrained.items(), body(i + 1, 0.1).values())}
        for i, task in enumerate(["cola", "mrpc", "rte"])
    }
    return pretrained, finetuned


def stable_sort_reference(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The spec's rule, literally: stable ascending sort of |τ|, keep idx[n_bot : N − n_top]."""
    if density >= 1:
        return tau.clone()
    flat = tau.reshape(-1)
    n = flat.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    idx = torch.sort(flat.abs(), stable=True).indices
    out = torch.zeros_like(flat)
    kept = idx[n_bot : n - n_top]
    out[kept] = flat[kept]
    return out.view(tau.shape)


# ---- the per-tensor rule (mergekit's magnitude_outliers, n_top = 0 fixed) ------------------------


def test_worked_example():
    tau = torch.arange(1.0, 11.0)  # N 10, target 5, n_top 1, n_bot 4
    expected = torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0])
    assert torch.equal(mask_magnitude_outliers(tau, 0.5, 0.1), expected)
    # Magnitude, not value or position, decides: the same with signs flipped and entries permuted.
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor([1.0, -1.0] * 5)
    assert torch.equal(mask_magnitude_outliers((tau * signs)[perm], 0.5, 0.1), (expected * signs)[perm])


def test_keep_fraction_one_is_unchanged():
    tau = torch.randn(7, 5)
    out = mask_magnitude_outliers(tau, 1.0, 0.1)
    assert torch.equal(out, tau) and out is not tau


@pytest.mark.parametrize(
    "n,density,gamma",
    [  # every case with n_top = int(γ·N) >= 1; n_top = 0 is the regression test's
        (n, density, gamma)
        for n in (10, 97, 768, 1000)
        for density, gamma in [(0.5, 0.1), (0.15, 0.006), (0.15, 0.01), (0.9, 0.1), (0.3, 0.7)]
        if int(gamma * n) >= 1
    ],
)
def test_kept_count_is_int_density_n(n, density, gamma):
    tau = torch.randn(n, generator=torch.Generator().manual_seed(n))
    out = mask_magnitude_outliers(tau, density, gamma)
    assert int((out != 0).sum()) == int(density * n)
    # The removed outliers are the int(γ·N) largest |τ|.
    top = tau.abs().topk(int(gamma * n)).indices
    assert torch.all(out[top] == 0)


@pytest.mark.parametrize("gamma", [0.001, 0.0])
def test_regression_no_outliers_keeps_int_density_n(gamma):
    # γ·N < 1 gives n_top = 0: mergekit's slice idx[n_bot:-0] is empty and zeroes the whole τ.
    tau = torch.randn(768, generator=torch.Generator().manual_seed(1))
    out = mask_magnitude_outliers(tau, 0.15, gamma)
    assert int((out != 0).sum()) == 115
    # With no outliers the kept entries are simply the 115 largest.
    assert torch.equal(out != 0, torch.zeros(768, dtype=torch.bool).index_fill(0, tau.abs().topk(115).indices, True))


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.integers(-4, 4), min_size=1, max_size=60),
    density=st.floats(0.01, 0.99),
    gamma=st.floats(0.0, 0.5),
)
def test_equals_stable_sort_reference_with_ties(values, density, gamma):
    # Small integers: many ties at the cut-offs, zeros included; the partition shortcut must
    # keep exactly the entries a stable sort keeps (up to zeros, which are 0 either way).
    if density + gamma > 1:
        gamma = 1 - density
    tau = torch.tensor(values, dtype=torch.float32) / 4
    assert torch.equal(mask_magnitude_outliers(tau, density, gamma), stable_sort_reference(tau, density, gamma))


def test_equals_stable_sort_reference_random_2d():
    tau = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    for density, gamma in [(0.15, 0.006), (0.5, 0.1), (0.2, 0.0)]:
        assert torch.equal(mask_magnitude_outliers(tau, density, gamma), stable_sort_reference(tau, density, gamma))


def test_per_tensor_rule_is_layout_invariant():
    # Per tensor, masking the stored [in, out] Conv1D weight or its [out, in] transpose is the same.
    tau = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask_magnitude_outliers(tau.T.contiguous(), 0.3, 0.1).T, mask_magnitude_outliers(tau, 0.3, 0.1))


# ---- the original code's per-row rule ------------------------------------------------------------


def test_per_row_768_wide_removes_4_keeps_115():
    g = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(3):  # magnitudes 1..768 in a random order with random signs, per row
        signs = torch.randint(0, 2, (768,), generator=g).float() * 2 - 1
        rows.append(torch.randperm(768, generator=g).float().add(1) * signs)
    tau = torch.stack(rows)
    out = mask_magnitude_outliers_per_row(tau, 0.15, 0.006)
    for row, masked in zip(tau, out):
        kept = masked != 0
        assert int(kept.sum()) == 115
        # 4 removed (|τ| 765..768), then the next 115 largest kept: |τ| 650..764.
        assert torch.equal(torch.sort(masked[kept].abs()).values, torch.arange(650.0, 765.0))
        assert torch.equal(masked[kept], row[kept])


def test_per_row_one_d_is_one_row_and_zero_d_unchanged():
    tau = torch.randn(768, generator=torch.Generator().manual_seed(5))
    as_one_row = mask_magnitude_outliers_per_row(tau[None], 0.15, 0.006)[0]
    assert torch.equal(mask_magnitude_outliers_per_row(tau, 0.15, 0.006), as_one_row)
    scalar = torch.tensor(3.0)
    assert torch.equal(mask_magnitude_outliers_per_row(scalar, 0.15, 0.006), scalar)


def test_per_row_masks_conv1d_weights_as_out_in():
    # GPT-2's Conv1D stores [in, out]; the paper's rows are output neurons: the stored columns.
    key, shape = "h.0.mlp.c_fc.weight", (4, 16)
    theta0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    theta1 = theta0 + torch.randn(shape, generator=torch.Generator().manual_seed(7))
    tau = theta1 - theta0
    out = breadcrumbs_tensor(key, theta0, [theta1], 0.5, 0.25, per_row=True)
    by_output_neuron = mask_magnitude_outliers_per_row(tau.T, 0.5, 0.25).T
    by_stored_row = mask_magnitude_outliers_per_row(tau, 0.5, 0.25)
    assert torch.equal(out, by_output_neuron)
    assert not torch.equal(out, by_stored_row)
    # Each output neuron (stored column) of width in = 4 keeps int(4·0.5) = 2 entries, 1 outlier removed.
    assert torch.all((out != 0).sum(0) == 2)
    # Embeddings are masked as stored: a row per token.
    wte0 = torch.randn(11, 4, generator=torch.Generator().manual_seed(8))
    wte1 = wte0 + torch.randn(11, 4, generator=torch.Generator().manual_seed(9))
    out = breadcrumbs_tensor("wte.weight", wte0, [wte1], 0.5, 0.25, per_row=True)
    assert torch.equal(out, mask_magnitude_outliers_per_row(wte1 - wte0, 0.5, 0.25))


# ---- the merge -----------------------------------------------------------------------------------


def test_merge_is_theta0_plus_lambda_sum_of_masked():
    pretrained, finetuned = tiny_bodies()
    merged = breadcrumbs_merge(pretrained, finetuned, 0.4, 0.5, 0.1)
    for key, theta0 in pretrained.items():
        summed = sum(mask_magnitude_outliers(body[key] - theta0, 0.5, 0.1) for body in finetuned.values())
        torch.testing.assert_close(merged[key], theta0 + 0.4 * summed, rtol=0, atol=1e-6)


def test_keep_fraction_one_is_task_arithmetic_bit_exact():
    pretrained, finetuned = tiny_bodies()
    expected = task_arithmetic_merge(pretrained, finetuned, 0.3)
    # Per tensor, keep 1 leaves τ untouched whatever γ (mergekit). Per row (the original rule),
    # keep 1 still removes each row's outliers, so only γ = 0 gives Task Arithmetic.
    for per_row, gamma in [(False, 0.1), (True, 0.0)]:
        merged = breadcrumbs_merge(pretrained, finetuned, 0.3, 1.0, gamma, per_row)
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_deterministic_and_inputs_untouched():
    pretrained, finetuned = tiny_bodies()
    copies = (
        {k: v.clone() for k, v in pretrained.items()},
        {t: {k: v.clone() for k, v in b.items()} for t, b in finetuned.items()},
    )
    for per_row in (False, True):
        first = breadcrumbs_merge(pretrained, finetuned, 0.3, 0.15, 0.05, per_row)
        second = breadcrumbs_merge(pretrained, finetuned, 0.3, 0.15, 0.05, per_row)
        assert list(first) == list(pretrained)
        assert all(torch.equal(first[k], second[k]) and first[k].shape == pretrained[k].shape for k in first)
    assert all(torch.equal(pretrained[k], copies[0][k]) for k in pretrained)
    assert all(torch.equal(finetuned[t][k], copies[1][t][k]) for t in finetuned for k in pretrained)


def test_per_row_differs_from_per_tensor():
    pretrained, finetuned = tiny_bodies()
    a = breadcrumbs_merge(pretrained, finetuned, 0.3, 0.5, 0.1, per_row=False)
    b = breadcrumbs_merge(pretrained, finetuned, 0.3, 0.5, 0.1, per_row=True)
    assert not torch.equal(a["h.0.mlp.c_fc.weight"], b["h.0.mlp.c_fc.weight"])


# ---- the MergeMethod: key by key over a real pool ------------------------------------------------


def same_bits(a: dict, b: dict) -> bool:
    """The same keys in the same order and the same float32 bits (so +0 and −0 differ)."""
    return list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.fixture
def pool(pool_paths) -> ModelPool:
    """The tiny real pool (7 tasks, 2 layers, 64 wide), read tensor by tensor."""
    return ModelPool(**pool_paths)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"per_row": True, "scaling_factor": 0.5},
        {"keep_fraction": 1.0},
        {"keep_fraction": 0.3, "outlier_fraction": 0.0},
    ],
)
def test_per_key_merge_equals_whole_body_bit_for_bit(pool, kwargs):
    merged = Breadcrumbs(pool, **kwargs).merge()
    assert same_bits(merged, breadcrumbs_merge(pool.pretrained_body(), pool.finetuned_bodies(), **kwargs))
    assert any(not torch.equal(merged[k], pool.pretrained_tensor(k)) for k in merged)


def test_a_lambda_sweep_masks_once(pool, monkeypatch):
    import mergelit.methods.breadcrumbs as breadcrumbs

    expected = breadcrumbs_merge(pool.pretrained_body(), pool.finetuned_bodies(), 0.9)
    pool.keep_reused(True)
    Breadcrumbs(pool, scaling_factor=0.3).merge()
    calls = []
    original = breadcrumbs.breadcrumbs_tensor
    monkeypatch.setattr(breadcrumbs, "breadcrumbs_tensor", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    merged = Breadcrumbs(pool, scaling_factor=0.9).merge()
    assert calls == [] and same_bits(merged, expected)
    Breadcrumbs(pool, scaling_factor=0.9, keep_fraction=0.2).merge()  # other masks: computed
    assert calls == pool.keys()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scaling_factor": math.nan}, "scaling_factor"),
        ({"scaling_factor": True}, "scaling_factor"),
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"outlier_fraction": -0.1}, "outlier_fraction"),
        ({"outlier_fraction": 1.0}, "outlier_fraction"),
        ({"keep_fraction": 0.9, "outlier_fraction": 0.2}, "keep_fraction \\+ outlier_fraction"),
    ],
)
def test_argument_validation(pool, kwargs, name):
    with pytest.raises(MergelitError, match=name):
        Breadcrumbs(pool, **kwargs)


def test_class_attributes_and_hyperparameters(pool):
    method = Breadcrumbs(pool, **Breadcrumbs.recommended)
    assert Breadcrumbs.display_name == "Model Breadcrumbs"
    assert set(Breadcrumbs.symbols) <= set(method.hparams)
    assert method.hparams["keep_fraction"] == 0.15 and method.hparams["outlier_fraction"] == 0.006
    assert method.bodies_at_inference() == 1.0
