"""WUDI: its special cases, FusionBench's formula bit for bit, the side it acts on, the closed form."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from mergelit.methods.wudi import (
    WUDIMerging,
    interference_loss,
    minimise_interference_adam,
    minimise_interference_closed_form,
    wudi_merge,
)
from mergelit.pool import ModelPool

# A GPT-2-like body in miniature; every 2-D tensor stored input index first, as GPT-2's.
SHAPES = {
    "wte.weight": (11, 4),
    "wpe.weight": (6, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
    "h.0.mlp.c_proj.weight": (8, 4),
}
TWO_D = [key for key, shape in SHAPES.items() if len(shape) == 2]
TASKS = ("a", "b", "c")


def make_pool(n_tasks: int = 3, seed: int = 0, dyadic: bool = False):
    """θ0 and θi = θ0 + τi by hand. ``dyadic``: multiples of 1/8, so θ0 + (θi − θ0) == θi exactly."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        if dyadic:
            return torch.randint(-16, 17, shape, generator=generator).float() / 8
        return torch.randn(shape, generator=generator) * scale

    pretrained = {key: draw(shape, 1.0) for key, shape in SHAPES.items()}
    finetuned = {
        task: {key: pretrained[key] + draw(shape, 0.1) for key, shape in SHAPES.items()}
        for task in TASKS[:n_tasks]
    }
    return pretrained, finetuned


def fusionbench_reference(pretrained, finetuned, iter_num, lr):
    """FusionBench's ``wudi_merging`` + ``run`` as the spec (section 8) describes them, line by line."""
    merged = {}
    for key, base in pretrained.items():
        stacked = torch.stack([body[key] - base for body in finetuned.values()])  # T = [τ1; …; τn]
        tau = torch.nn.Parameter(torch.sum(stacked, dim=0))  # τ ← Σ τi
        if base.dim() == 2:
            optimizer = torch.optim.Adam([tau], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
            norms = torch.norm(stacked.reshape(stacked.shape[0], -1), p=2, dim=-1) ** 2
            for _ in range(iter_num):
                product = torch.matmul(tau - stacked, stacked.transpose(1, 2))
                loss = (product**2 / norms[:, None, None]).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            merged[key] = base + tau.detach()
        else:
            merged[key] = base + tau.detach() / len(finetuned)  # the mean
    return merged


def clone(state):
    return {key: tensor.clone() for key, tensor in state.items()}


def transposed(state):
    return {key: t.T.contiguous() if t.dim() == 2 else t for key, t in state.items()}


def stacked_task_vectors(pretrained, finetuned, key):
    return torch.stack([body[key] - pretrained[key] for body in finetuned.values()])


def input_side_loss(tau, stacked):
    """Σi ‖τiᵀ(τ − τi)‖² / ‖τi‖² for [in, out] tensors, written directly (not via a transpose)."""
    return sum(
        torch.sum((t.T @ (tau - t)) ** 2) / torch.sum(t**2) for t in stacked if torch.sum(t**2) > 0
    )


def gradient(loss_fn, tau):
    tau = tau.detach().double().requires_grad_(True)
    loss_fn(tau).backward()
    return tau.grad


class StubPool:
    """The two ModelPool methods a data-free merge reads."""

    def __init__(self, pretrained, finetuned):
        self.tasks = list(finetuned)
        self._pretrained, self._finetuned = pretrained, finetuned

    def pretrained_body(self):
        return self._pretrained

    def finetuned_bodies(self):
        return self._finetuned


# ---- special cases -------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_zero_steps_give_the_sum_on_2d_keys_and_the_mean_elsewhere(side):
    pretrained, finetuned = make_pool()
    merged = wudi_merge(pretrained, finetuned, iter_num=0, side=side, progress=False)
    for key, base in pretrained.items():
        summed = torch.sum(stacked_task_vectors(pretrained, finetuned, key), dim=0)
        expected = base + summed if key in TWO_D else base + summed / 3
        assert torch.equal(merged[key], expected), key


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_one_task_gives_its_own_body(side, solver):
    pretrained, finetuned = make_pool(n_tasks=1, dyadic=True)
    merged = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, side=side, solver=solver, progress=False)
    for key in pretrained:
        if solver == "adam":  # zero gradient: Adam does not move
            assert torch.equal(merged[key], finetuned["a"][key]), key
        else:  # τ1 G1 (G1)⁺ = τ1, up to the float64 solve's rounding
            torch.testing.assert_close(merged[key], finetuned["a"][key], rtol=1e-6, atol=1e-6)


def test_matches_fusionbench_formula_bit_for_bit():
    pretrained, finetuned = make_pool()
    merged = wudi_merge(pretrained, finetuned, iter_num=30, lr=1e-2, side="fusionbench", progress=False)
    expected = fusionbench_reference(pretrained, finetuned, iter_num=30, lr=1e-2)
    start = wudi_merge(pretrained, finetuned, iter_num=0, side="fusionbench", progress=False)
    for key in pretrained:
        assert torch.equal(merged[key], expected[key]), key
    # The steps did move the 2-D tensors (the comparison is not of two starting points).
    assert all((merged[key] - start[key]).abs().max() > 1e-2 for key in TWO_D)


# ---- which side ------------------------------------------------------------------------------
def test_input_side_is_fusionbench_formula_on_the_transpose():
    """Conv1D / embeddings are [in, out]; the input side is FusionBench's formula on Wᵀ ([out, in])."""
    pretrained, finetuned = make_pool()
    ours = wudi_merge(pretrained, finetuned, iter_num=20, lr=1e-2, side="input", progress=False)
    on_transpose = wudi_merge(
        transposed(pretrained),
        {task: transposed(body) for task, body in finetuned.items()},
        iter_num=20,
        lr=1e-2,
        side="fusionbench",
        progress=False,
    )
    stored_side = wudi_merge(pretrained, finetuned, iter_num=20, lr=1e-2, side="fusionbench", progress=False)
    for key in pretrained:
        assert torch.equal(ours[key], transposed(on_transpose)[key]), key
    # …and the two sides differ (the option pins something).
    for key in TWO_D:
        assert not torch.allclose(ours[key], stored_side[key], atol=1e-4), key


def test_input_side_minimises_the_papers_loss_written_directly():
    """Independent of the transposition: at the input-side minimiser, the gradient of
    Σi ‖τiᵀ(τ − τi)‖²/ci (W [in, out]) vanishes and the gradient of the stored-side formula does not."""
    pretrained, finetuned = make_pool()
    key = "h.0.attn.c_attn.weight"  # [4, 12]: the two sides' products are [12, 12] and [4, 4]
    stacked = stacked_task_vectors(pretrained, finetuned, key).double()
    merged = wudi_merge(pretrained, finetuned, solver="closed_form", side="input", progress=False)
    tau = (merged[key] - pretrained[key]).double()
    start = stacked.sum(0)
    norms = stacked.reshape(3, -1).norm(dim=-1) ** 2
    paper = gradient(lambda t: input_side_loss(t, stacked), tau)
    assert paper.norm() < 1e-5 * gradient(lambda t: input_side_loss(t, stacked), start).norm()
    stored = gradient(lambda t: interference_loss(t, stacked, norms), tau)
    assert stored.norm() > 1e-2 * gradient(lambda t: interference_loss(t, stacked, norms), start).norm()


# ---- the optimiser and the closed form ---------------------------------------------------------
def test_loss_decreases_monotonically_for_a_small_lr():
    pretrained, finetuned = make_pool()
    stacked = stacked_task_vectors(pretrained, finetuned, "h.0.attn.c_attn.weight")
    _, losses = minimise_interference_adam(stacked, iter_num=50, lr=1e-4)
    assert losses.shape == (50,)
    assert bool((losses[1:] < losses[:-1]).all())


@pytest.mark.parametrize("key", TWO_D)
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_closed_form_minimises_the_loss(key, n_tasks):
    pretrained, finetuned = make_pool(n_tasks=n_tasks)
    stacked = stacked_task_vectors(pretrained, finetuned, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank (or b > n·a, the min-norm case): no warning
        tau = minimise_interference_closed_form(stacked, key)
    assert tau.dtype == torch.float32 and tau.shape == stacked.shape[1:]
    vectors = stacked.double()
    norms = vectors.reshape(n_tasks, -1).norm(dim=-1) ** 2
    loss = lambda t: interference_loss(t, vectors, norms)  # noqa: E731
    assert gradient(loss, tau).norm() < 1e-5 * gradient(loss, vectors.sum(0)).norm()
    adam, _ = minimise_interference_adam(stacked, iter_num=50, lr=1e-2)
    assert loss(tau.double()) <= loss(adam.double())


def test_closed_form_warns_when_the_minimiser_is_not_unique():
    pretrained, finetuned = make_pool(n_tasks=2)
    key = "h.0.attn.c_attn.weight"  # [4, 12] on the stored side: A is [8, 12], rank ≤ 4 if τ1 = τ2
    finetuned["b"] = {k: v.clone() for k, v in finetuned["a"].items()}
    stacked = stacked_task_vectors(pretrained, finetuned, key)
    with pytest.warns(UserWarning, match="c_attn"):
        tau = minimise_interference_closed_form(stacked, key)
    torch.testing.assert_close(tau, stacked[0], rtol=1e-5, atol=1e-6)  # min-norm minimiser: τ1 itself


# ---- guards and arguments -------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_a_zero_task_vector_is_left_out_of_the_loss(solver):
    pretrained, finetuned = make_pool(n_tasks=2)
    with_zero = dict(finetuned, c={k: v.clone() for k, v in pretrained.items()})  # θc = θ0: τc = 0
    merged = wudi_merge(pretrained, with_zero, iter_num=10, lr=1e-2, solver=solver, progress=False)
    without = wudi_merge(pretrained, finetuned, iter_num=10, lr=1e-2, solver=solver, progress=False)
    for key, base in pretrained.items():
        assert torch.isfinite(merged[key]).all(), key
        if key in TWO_D:
            torch.testing.assert_close(merged[key], without[key], rtol=0, atol=1e-6)
        else:  # the mean counts the zero task
            torch.testing.assert_close(merged[key], base + (without[key] - base) * 2 / 3)
    # Every task zero on a tensor: it stays at θ0.
    all_zero = {task: {k: v.clone() for k, v in pretrained.items()} for task in "ab"}
    merged = wudi_merge(pretrained, all_zero, iter_num=3, solver=solver, progress=False)
    assert all(torch.equal(merged[key], pretrained[key]) for key in pretrained)


def test_fusionbench_side_refuses_gpt2_wte_and_names_the_fix():
    shapes = {"wte.weight": (50257, 2), "h.0.ln_1.weight": (2,)}
    pretrained = {k: torch.zeros(s) for k, s in shapes.items()}
    finetuned = {t: {k: torch.full(s, float(i + 1)) for k, s in shapes.items()} for i, t in enumerate("ab")}
    with pytest.raises(ValueError, match=r"exclude_keys: \[wte\.weight\]"):
        wudi_merge(pretrained, finetuned, side="fusionbench", progress=False)
    # FusionBench's own workaround: wte then gets θ0 + mean τ.
    merged = wudi_merge(pretrained, finetuned, side="fusionbench", exclude_keys=["wte.weight"], progress=False)
    assert torch.equal(merged["wte.weight"], torch.full((50257, 2), 1.5))


def test_excluded_keys_get_the_mean():
    pretrained, finetuned = make_pool()
    merged = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, exclude_keys=["wpe.weight"], progress=False)
    summed = torch.sum(stacked_task_vectors(pretrained, finetuned, "wpe.weight"), dim=0)
    assert torch.equal(merged["wpe.weight"], pretrained["wpe.weight"] + summed / 3)


def test_deterministic_and_inputs_untouched():
    pretrained, finetuned = make_pool()
    copies = clone(pretrained), {task: clone(body) for task, body in finetuned.items()}
    first = wudi_merge(pretrained, finetuned, iter_num=10, lr=1e-2, progress=False)
    second = wudi_merge(pretrained, finetuned, iter_num=10, lr=1e-2, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(pretrained[k], copies[0][k]) for k in pretrained)
    assert all(torch.equal(finetuned[t][k], copies[1][t][k]) for t in finetuned for k in pretrained)


def test_runs_under_inference_mode():
    """Lightning may call setup under torch.inference_mode: the Adam steps must still record."""
    pretrained, finetuned = make_pool()
    expected = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, progress=False)
    with torch.inference_mode():
        merged = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, progress=False)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iter_num": -1}, "iter_num"),
        ({"iter_num": 2.5}, "iter_num"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"side": "output"}, "side"),
        ({"solver": "sgd"}, "solver"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    pretrained, finetuned = make_pool()
    with pytest.raises(ValueError, match=match):
        WUDIMerging(StubPool(pretrained, finetuned), **kwargs)
    with pytest.raises(ValueError, match=match):
        wudi_merge(pretrained, finetuned, progress=False, **kwargs)


def test_unknown_excluded_key_is_refused():
    pretrained, finetuned = make_pool()
    with pytest.raises(ValueError, match="wte_typo"):
        wudi_merge(pretrained, finetuned, exclude_keys=["wte_typo"], progress=False)


def test_recommended_arguments_run_on_the_tiny_pool(fixtures_root):
    pool = ModelPool(**yaml.safe_load((fixtures_root / "config.yaml").read_text())["pool"])
    method = WUDIMerging(pool, **{**WUDIMerging.recommended, "iter_num": 10})  # a few steps: seconds
    merged = method.merge()
    pretrained = pool.pretrained_body()
    assert list(merged) == list(pretrained)
    assert all(merged[k].shape == pretrained[k].shape and torch.isfinite(merged[k]).all() for k in merged)
