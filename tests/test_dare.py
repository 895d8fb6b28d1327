"""DARE + Task Arithmetic / TIES: FusionBench's draw order bit-exactly, the spec's cases, validation."""

from __future__ import annotations

import math

import pytest
import torch

from mergelit.methods.dare import (
    DareTaskArithmetic,
    DareTiesMerging,
    dare_drop_and_rescale,
    dare_task_arithmetic_merge,
    dare_task_vector_sum,
    dare_ties_merge,
    drop_and_rescale,
)
from mergelit.methods.task_arithmetic import TaskArithmetic, task_arithmetic_merge
from mergelit.methods.ties import TiesMerging, ties_task_vector_from_task_vectors
from mergelit.pool import ModelPool

SHAPES = {
    "wte.weight": (11, 4),
    "wpe.weight": (6, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.ln_1.bias": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
    "h.0.attn.c_proj.weight": (4, 4),
    "h.0.mlp.c_fc.weight": (4, 16),
    "h.0.mlp.c_proj.weight": (16, 4),
    "ln_f.weight": (4,),
}
CONV1D = {"h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"}
TASKS = ["cola", "mnli", "mrpc"]


def body(seed: int, scale: float = 1.0, shapes: dict = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=g) for key, shape in shapes.items()}


def tiny_pool(shapes: dict = SHAPES):
    pretrained = body(0, shapes=shapes)
    finetuned = {
        task: {k: v + d for (k, v), d in zip(pretrained.items(), body(i + 1, 0.1, shapes).values())}
        for i, task in enumerate(TASKS)
    }
    return pretrained, finetuned


def fusionbench_reference_task_vectors(pretrained, finetuned, p, rescale, seed, only=None):
    """FusionBench's loop as the spec describes it, line by line: seed the global RNG
    (seed_everything), τi = θi − θ0 for every model, then for each model in pool order and each
    parameter in named_parameters order: mask = rand_like(τ) > p; τ = τ * mask; τ = τ / (1 − p).
    ``only``: the keys that would be dropped (nn.Linear weights); None = all."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task_vectors = [{k: theta[k] - pretrained[k] for k in theta} for theta in finetuned.values()]
        for tv in task_vectors:
            for name in tv:
                if only is not None and name not in only:
                    continue
                mask = torch.rand_like(tv[name]) > p
                tv[name] = tv[name] * mask
                if rescale:
                    tv[name] = tv[name] / (1 - p)
    return task_vectors


def fusionbench_reference_task_arithmetic(pretrained, finetuned, p, rescale, seed, scaling_factor, only=None):
    tvs = fusionbench_reference_task_vectors(pretrained, finetuned, p, rescale, seed, only)
    summed = {k: v.clone() for k, v in tvs[0].items()}  # state_dict_sum, pool order
    for tv in tvs[1:]:
        summed = {k: summed[k] + tv[k] for k in summed}
    return {k: pretrained[k] + summed[k] * scaling_factor for k in pretrained}  # delta * λ, then add_


def all_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- (3) the same generator state reproduces FusionBench bit-exactly -----------------------------


@pytest.mark.parametrize("p,rescale", [(0.5, True), (0.9, True), (0.3, False), (0.0, True)])
@pytest.mark.parametrize("seed", [0, 42])
def test_task_arithmetic_equals_fusionbench_loop_bit_exactly(p, rescale, seed):
    pretrained, finetuned = tiny_pool()
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, p, rescale, seed)
    assert all_equal(ours, fusionbench_reference_task_arithmetic(pretrained, finetuned, p, rescale, seed, 0.3))


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_equals_fusionbench_loop_bit_exactly(merge_func):
    # FusionBench passes the τ̃i themselves to TIES, then θ0 + λ τm.
    pretrained, finetuned = tiny_pool()
    tvs = fusionbench_reference_task_vectors(pretrained, finetuned, 0.5, True, 7)
    merged_tau = ties_task_vector_from_task_vectors(tvs, 20, merge_func)
    expected = {k: pretrained[k] + merged_tau[k] * 0.5 for k in pretrained}
    assert all_equal(dare_ties_merge(pretrained, finetuned, 0.5, 0.5, True, 7, False, 20, merge_func), expected)


def test_global_rng_untouched():
    pretrained, finetuned = tiny_pool()
    state = torch.random.get_rng_state()
    dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_masks_follow_conv1d_storage_order():
    # rand_like fills the stored [in, out] layout: masking τ or its contiguous transpose with the
    # same generator state assigns different draws to the same weight.
    tau = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    stored = drop_and_rescale(tau, 0.5, True, torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        assert torch.equal(stored, tau * (torch.rand_like(tau) > 0.5) / 0.5)
    transposed = drop_and_rescale(tau.T.contiguous(), 0.5, True, torch.Generator().manual_seed(0)).T
    assert not torch.equal(stored, transposed)
    # A non-contiguous view draws in its storage order too, as rand_like does.
    view = drop_and_rescale(tau.T, 0.5, True, torch.Generator().manual_seed(0))
    assert torch.equal(view, stored.T)


# ---- (1) only_conv1d_weights ----------------------------------------------------------------------


def test_only_conv1d_on_a_body_without_conv1d_keys_is_task_arithmetic():
    # The analogue of FusionBench's only_on_linear_weights on GPT-2: nothing qualifies, nothing drops.
    shapes = {k: v for k, v in SHAPES.items() if k not in CONV1D}
    pretrained, finetuned = tiny_pool(shapes)
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 0, only_conv1d_weights=True)
    assert all_equal(ours, task_arithmetic_merge(pretrained, finetuned, 0.3))


def test_only_conv1d_drops_exactly_the_conv1d_weights_in_fusionbench_order():
    pretrained, finetuned = tiny_pool()
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 3, only_conv1d_weights=True)
    plain = task_arithmetic_merge(pretrained, finetuned, 0.3)
    for key in SHAPES:
        assert torch.equal(ours[key], plain[key]) == (key not in CONV1D), key
    # Draws only for the dropped tensors, in order: FusionBench with these keys as its "linear" weights.
    expected = fusionbench_reference_task_arithmetic(pretrained, finetuned, 0.5, True, 3, 0.3, only=CONV1D)
    assert all_equal(ours, expected)


# ---- (2) p = 0 equals Task Arithmetic (TIES) on the tiny pool ------------------------------------


def test_p0_equals_task_arithmetic_and_ties_on_the_tiny_pool(pool_paths):
    # u > 0 still drops a draw of exactly 0 (probability 2^-24). The draws depend only on the seed and
    # the shapes: for seed 0 none of the tiny pool's 23.4 M draws is 0 (checked), so this is bit-exact.
    pool = ModelPool(**pool_paths)
    pretrained, finetuned = pool.pretrained_body(), pool.finetuned_bodies()
    ta = TaskArithmetic(pool, scaling_factor=0.3).merge()
    assert all_equal(DareTaskArithmetic(pool, scaling_factor=0.3, sparsity_ratio=0.0).merge(), ta)
    ties = TiesMerging(pool, scaling_factor=0.5).merge()
    assert all_equal(DareTiesMerging(pool, scaling_factor=0.5, sparsity_ratio=0.0).merge(), ties)
    expected = task_arithmetic_merge(pretrained, finetuned, 0.3)
    assert all_equal(dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.0), expected)


# ---- (4) unbiased; kept fraction Binomial(N, 1 − p) ----------------------------------------------


def test_mean_over_seeds_is_task_arithmetic_and_kept_fraction_within_3_sigma():
    p, seeds = 0.5, 400
    tau = {"h.0.mlp.c_fc.weight": torch.linspace(-1, 1, 256).reshape(16, 16)}
    total, kept = torch.zeros(16, 16, dtype=torch.float64), 0
    for seed in range(seeds):
        sparse = dare_drop_and_rescale(tau, p, True, torch.Generator().manual_seed(seed))["h.0.mlp.c_fc.weight"]
        total += sparse.double()
        kept += int((sparse != 0).sum()) - int((tau["h.0.mlp.c_fc.weight"] == 0).sum())
    mean, t = total / seeds, tau["h.0.mlp.c_fc.weight"].double()
    # Per entry the mean is τ·K/(S(1−p)), K ~ Binomial(S, 1−p): std |τ|·sqrt(p / ((1−p)·S)).
    sigma = t.abs() * math.sqrt(p / ((1 - p) * seeds))
    assert torch.all((mean - t).abs() <= 5 * sigma + 1e-12)
    assert abs((mean - t).mean()) < 3 * sigma.pow(2).mean().sqrt() / 16  # the average error, 256 entries
    n = seeds * (256 - int((t == 0).sum()))
    assert abs(kept - n * (1 - p)) <= 3 * math.sqrt(n * p * (1 - p))


# ---- (5) p = 1 with rescale raises; without rescale it drops everything --------------------------

FAKE_POOL = dict(pretrained="/nonexistent/gpt2", finetuned={"cola": "/nonexistent/cola"})


@pytest.mark.parametrize("cls", [DareTaskArithmetic, DareTiesMerging])
def test_p1_with_rescale_raises(cls):
    with pytest.raises(ValueError, match="sparsity_ratio 1 with rescale"):
        cls(ModelPool(**FAKE_POOL), sparsity_ratio=1.0)
    cls(ModelPool(**FAKE_POOL), sparsity_ratio=1.0, rescale=False)  # allowed: drops every entry
    pretrained, finetuned = tiny_pool()
    with pytest.raises(ValueError, match="sparsity_ratio"):
        dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 1.0, True)


def test_p1_without_rescale_is_pretrained():
    pretrained, finetuned = tiny_pool()
    merged = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 1.0, rescale=False)
    assert all(torch.equal(merged[k], pretrained[k]) for k in pretrained)


# ---- determinism, inputs, validation -------------------------------------------------------------


@pytest.mark.parametrize("merge", [dare_task_arithmetic_merge, dare_ties_merge])
def test_same_seed_bit_identical_different_seed_different(merge):
    pretrained, finetuned = tiny_pool()
    copies = {t: {k: v.clone() for k, v in b.items()} for t, b in finetuned.items()}
    first = merge(pretrained, finetuned, 0.3, 0.5, True, 11)
    assert all_equal(first, merge(pretrained, finetuned, 0.3, 0.5, True, 11))
    assert not all_equal(first, merge(pretrained, finetuned, 0.3, 0.5, True, 12))
    assert all(torch.equal(finetuned[t][k], copies[t][k]) for t in finetuned for k in SHAPES)
    assert all(first[k].shape == pretrained[k].shape for k in pretrained)


def test_sum_is_reused_across_lambda():
    pretrained, finetuned = tiny_pool()
    summed = dare_task_vector_sum(pretrained, finetuned, 0.5, True, 0)
    for scaling_factor in (0.0, 0.3, 1.0):
        expected = {k: pretrained[k] + scaling_factor * summed[k] for k in pretrained}
        assert all_equal(dare_task_arithmetic_merge(pretrained, finetuned, scaling_factor, 0.5, True, 0), expected)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scaling_factor": math.inf}, "scaling_factor"),
        ({"sparsity_ratio": -0.1}, "sparsity_ratio"),
        ({"sparsity_ratio": 1.5, "rescale": False}, "sparsity_ratio"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
@pytest.mark.parametrize("cls", [DareTaskArithmetic, DareTiesMerging])
def test_argument_validation(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(ModelPool(**FAKE_POOL), **kwargs)


@pytest.mark.parametrize(
    "kwargs,name", [({"threshold": 0}, "threshold"), ({"threshold": 101}, "threshold"), ({"merge_func": "median"}, "merge_func")]
)
def test_ties_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DareTiesMerging(ModelPool(**FAKE_POOL), **kwargs)


def test_defaults_and_hyperparameters():
    ta = DareTaskArithmetic(ModelPool(**FAKE_POOL))
    defaults = (ta.scaling_factor, ta.sparsity_ratio, ta.rescale, ta.seed, ta.only_conv1d_weights)
    assert defaults == (0.3, 0.5, True, 0, False)
    ties = DareTiesMerging(ModelPool(**FAKE_POOL))
    assert (ties.scaling_factor, ties.threshold, ties.merge_func) == (0.5, 20, "sum")
    assert ties.hparams["seed"] == 0 and set(DareTiesMerging.symbols) <= set(ties.hparams)
    assert DareTaskArithmetic.display_name == "DARE + Task Arithmetic"
