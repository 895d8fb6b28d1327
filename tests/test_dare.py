"""DARE + Task Arithmetic / TIES: FusionBench's draw order bit-exactly, the spec's cases, the per-key
merge against the whole-body functions, validation."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import mergelit.methods.dare as dare
from mergelit.errors import MergelitError
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
from mergelit.methods.ties import TiesMerging
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


def tiny_bodies(shapes: dict = SHAPES):
    """θ0 and three θi as hand-sized state dicts (for the whole-body functions)."""
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


def fusionbench_ties_merging(flat_task_checks: torch.Tensor, reset_thresh: float, merge_func: str) -> torch.Tensor:
    """FusionBench's ``ties_merging`` on the [n, d] stack of flat task vectors, line by line:
    ``topk_values_mask`` (kthvalue per row), ``resolve_sign`` (majority for zeros), ``disjoint_merge``."""
    checks = flat_task_checks.clone()
    fraction = reset_thresh / 100 if reset_thresh > 1 else reset_thresh
    d = checks.shape[1]
    kth = checks.abs().kthvalue(d - int(d * fraction), dim=1, keepdim=True).values
    updated = checks * (checks.abs() >= kth)
    sign = torch.sign(updated.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = updated * torch.where(sign.unsqueeze(0) > 0, updated > 0, updated < 0)
    if merge_func == "mean":
        return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    return selected.abs().max(dim=0)[0] * sign


def all_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def same_bits(a: dict, b: dict) -> bool:
    """The same keys in the same order and the same float32 bits (so +0 and −0 differ)."""
    return list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.fixture
def pool(pool_paths) -> ModelPool:
    """The tiny real pool (7 tasks, 2 layers, 64 wide), read tensor by tensor."""
    return ModelPool(**pool_paths)


# ---- (3) the same generator state reproduces FusionBench bit-exactly -----------------------------


@pytest.mark.parametrize("p,rescale", [(0.5, True), (0.9, True), (0.3, False), (0.0, True)])
@pytest.mark.parametrize("seed", [0, 42])
def test_task_arithmetic_equals_fusionbench_loop_bit_exactly(p, rescale, seed):
    pretrained, finetuned = tiny_bodies()
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, p, rescale, seed)
    assert all_equal(ours, fusionbench_reference_task_arithmetic(pretrained, finetuned, p, rescale, seed, 0.3))


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_equals_fusionbench_loop_bit_exactly(merge_func):
    # FusionBench flattens the τ̃i themselves (keys sorted by name), runs ties_merging, then θ0 + τm·λ.
    pretrained, finetuned = tiny_bodies()
    tvs = fusionbench_reference_task_vectors(pretrained, finetuned, 0.5, True, 7)
    keys = sorted(pretrained)
    merged = fusionbench_ties_merging(torch.stack([torch.cat([tv[k].reshape(-1) for k in keys]) for tv in tvs]), 20, merge_func)
    pieces = dict(zip(keys, merged.split([pretrained[k].numel() for k in keys])))
    expected = {k: pretrained[k] + pieces[k].view(pretrained[k].shape) * 0.5 for k in pretrained}
    assert all_equal(dare_ties_merge(pretrained, finetuned, 0.5, 0.5, True, 7, False, 20, merge_func), expected)


def test_global_rng_untouched(pool):
    pretrained, finetuned = tiny_bodies()
    state = torch.random.get_rng_state()
    dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 0)
    DareTaskArithmetic(pool).merge()
    DareTiesMerging(pool).merge()
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


# ---- key by key over a pool: the same bits as the whole-body functions ----------------------------

TA_VARIANTS = [
    {},
    {"sparsity_ratio": 0.9, "seed": 3},
    {"only_conv1d_weights": True},
    {"rescale": False, "scaling_factor": 0.7},
    {"sparsity_ratio": 1.0, "rescale": False},
]


@pytest.mark.parametrize("kwargs", TA_VARIANTS)
def test_task_arithmetic_per_key_equals_whole_body_bit_for_bit(pool, kwargs):
    merged = DareTaskArithmetic(pool, **kwargs).merge()
    args = {"scaling_factor": 0.3, **kwargs}
    assert same_bits(merged, dare_task_arithmetic_merge(pool.pretrained_body(), pool.finetuned_bodies(), **args))


TIES_VARIANTS = [
    {},
    {"merge_func": "mean", "seed": 5},
    {"merge_func": "max", "scaling_factor": 0.6},
    {"only_conv1d_weights": True, "threshold": 10},
    {"threshold": 100, "rescale": False},  # keeps everything: the cut is the smallest |τ̃|, 0 (dropped entries, ±0)
]


@pytest.mark.parametrize("kwargs", TIES_VARIANTS)
def test_ties_per_key_equals_whole_body_bit_for_bit(pool, kwargs):
    merged = DareTiesMerging(pool, **kwargs).merge()
    args = {"scaling_factor": 0.5, **kwargs}
    assert same_bits(merged, dare_ties_merge(pool.pretrained_body(), pool.finetuned_bodies(), **args))


def test_ties_threshold_02_is_20(pool, caplog):
    # As FusionBench (and TIES-Merging): a threshold <= 1 is a fraction, so 0.2 keeps 20 %, not 0.2 %.
    with caplog.at_level(logging.INFO):
        fraction = DareTiesMerging(pool, threshold=0.2)
    assert "read as a fraction" in caplog.text and "20 %" in caplog.text
    percent = DareTiesMerging(pool, threshold=20)
    assert fraction.reusable_key() == percent.reusable_key()
    merged = fraction.merge()
    assert same_bits(merged, percent.merge())
    assert same_bits(merged, dare_ties_merge(pool.pretrained_body(), pool.finetuned_bodies(), threshold=0.2))


@pytest.mark.parametrize("cls", [DareTaskArithmetic, DareTiesMerging])
def test_a_key_merged_again_gives_the_same_bits(pool, cls):
    # The recorded draws of a key are dropped once it is merged; asking for it again redraws them.
    method = cls(pool)
    merged = method.merge()
    key = "h.1.mlp.c_fc.weight"
    again = method.merge_tensor(key, pool.pretrained_tensor(key), pool.finetuned_tensors(key))
    assert torch.equal(again.view(torch.int32), merged[key].view(torch.int32))


def test_a_lambda_sweep_draws_once(pool, monkeypatch):
    # With the pool keeping λ-free parts (a sweep), the second λ neither draws nor elects again.
    pretrained, finetuned = pool.pretrained_body(), pool.finetuned_bodies()
    pool.keep_reused(True)
    DareTiesMerging(pool, scaling_factor=0.3, threshold=20).merge()

    def refused(*args, **kwargs):
        raise AssertionError("drew again")

    monkeypatch.setattr(dare.DareDraws, "record", refused)
    # 0.2 is the same trim as 20: the same λ-free parts.
    ties = DareTiesMerging(pool, scaling_factor=0.8, threshold=0.2).merge()
    assert same_bits(ties, dare_ties_merge(pretrained, finetuned, 0.8))
    monkeypatch.undo()
    DareTaskArithmetic(pool, scaling_factor=0.3).merge()  # another method's group: drawn, kept instead
    monkeypatch.setattr(dare.DareDraws, "record", refused)
    ta = DareTaskArithmetic(pool, scaling_factor=0.7).merge()
    assert same_bits(ta, dare_task_arithmetic_merge(pretrained, finetuned, 0.7))
    # A different seed is another group: it draws.
    with pytest.raises(AssertionError, match="drew again"):
        DareTaskArithmetic(pool, scaling_factor=0.7, seed=1).merge()


# ---- (1) only_conv1d_weights ----------------------------------------------------------------------


def test_only_conv1d_on_a_body_without_conv1d_keys_is_task_arithmetic():
    # The analogue of FusionBench's only_on_linear_weights on GPT-2: nothing qualifies, nothing drops.
    shapes = {k: v for k, v in SHAPES.items() if k not in CONV1D}
    pretrained, finetuned = tiny_bodies(shapes)
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 0, only_conv1d_weights=True)
    assert all_equal(ours, task_arithmetic_merge(pretrained, finetuned, 0.3))


def test_only_conv1d_drops_exactly_the_conv1d_weights_in_fusionbench_order():
    pretrained, finetuned = tiny_bodies()
    ours = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 0.5, True, 3, only_conv1d_weights=True)
    plain = task_arithmetic_merge(pretrained, finetuned, 0.3)
    for key in SHAPES:
        assert torch.equal(ours[key], plain[key]) == (key not in CONV1D), key
    # Draws only for the dropped tensors, in order: FusionBench with these keys as its "linear" weights.
    expected = fusionbench_reference_task_arithmetic(pretrained, finetuned, 0.5, True, 3, 0.3, only=CONV1D)
    assert all_equal(ours, expected)


# ---- (2) p = 0 equals Task Arithmetic (TIES) on the tiny pool ------------------------------------


def test_p0_equals_task_arithmetic_and_ties_on_the_tiny_pool(pool):
    # u > 0 still drops a draw of exactly 0 (probability 2^-24). The draws depend only on the seed and
    # the shapes: for seed 0 none of the tiny pool's 23.4 M draws is 0 (checked), so this is bit-exact.
    ta = TaskArithmetic(pool, scaling_factor=0.3).merge()
    assert all_equal(DareTaskArithmetic(pool, scaling_factor=0.3, sparsity_ratio=0.0).merge(), ta)
    ties = TiesMerging(pool, scaling_factor=0.5).merge()
    assert all_equal(DareTiesMerging(pool, scaling_factor=0.5, sparsity_ratio=0.0).merge(), ties)
    expected = task_arithmetic_merge(pool.pretrained_body(), pool.finetuned_bodies(), 0.3)
    assert all_equal(dare_task_arithmetic_merge(pool.pretrained_body(), pool.finetuned_bodies(), 0.3, 0.0), expected)


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


@pytest.mark.parametrize("cls", [DareTaskArithmetic, DareTiesMerging])
def test_p1_with_rescale_raises(pool, cls):
    with pytest.raises(MergelitError, match="sparsity_ratio 1 with rescale"):
        cls(pool, sparsity_ratio=1.0)
    cls(pool, sparsity_ratio=1.0, rescale=False)  # allowed: drops every entry
    pretrained, finetuned = tiny_bodies()
    with pytest.raises(MergelitError, match="sparsity_ratio"):
        dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 1.0, True)


def test_p1_without_rescale_is_pretrained(pool):
    pretrained, finetuned = tiny_bodies()
    merged = dare_task_arithmetic_merge(pretrained, finetuned, 0.3, 1.0, rescale=False)
    assert all(torch.equal(merged[k], pretrained[k]) for k in pretrained)
    merged = DareTaskArithmetic(pool, sparsity_ratio=1.0, rescale=False).merge()
    assert all(torch.equal(merged[k], pool.pretrained_tensor(k)) for k in pool.keys())


# ---- determinism, inputs, validation -------------------------------------------------------------


@pytest.mark.parametrize("merge", [dare_task_arithmetic_merge, dare_ties_merge])
def test_same_seed_bit_identical_different_seed_different(merge):
    pretrained, finetuned = tiny_bodies()
    copies = {t: {k: v.clone() for k, v in b.items()} for t, b in finetuned.items()}
    first = merge(pretrained, finetuned, 0.3, 0.5, True, 11)
    assert all_equal(first, merge(pretrained, finetuned, 0.3, 0.5, True, 11))
    assert not all_equal(first, merge(pretrained, finetuned, 0.3, 0.5, True, 12))
    assert all(torch.equal(finetuned[t][k], copies[t][k]) for t in finetuned for k in SHAPES)
    assert all(first[k].shape == pretrained[k].shape for k in pretrained)


def test_sum_is_reused_across_lambda():
    pretrained, finetuned = tiny_bodies()
    summed = dare_task_vector_sum(pretrained, finetuned, 0.5, True, 0)
    for scaling_factor in (0.0, 0.3, 1.0):
        expected = {k: pretrained[k] + scaling_factor * summed[k] for k in pretrained}
        assert all_equal(dare_task_arithmetic_merge(pretrained, finetuned, scaling_factor, 0.5, True, 0), expected)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scaling_factor": math.inf}, "scaling_factor"),
        ({"scaling_factor": "0.3"}, "scaling_factor"),
        ({"sparsity_ratio": -0.1}, "sparsity_ratio"),
        ({"sparsity_ratio": 1.5, "rescale": False}, "sparsity_ratio"),
        ({"sparsity_ratio": math.nan}, "sparsity_ratio"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
@pytest.mark.parametrize("cls", [DareTaskArithmetic, DareTiesMerging])
def test_argument_validation(pool, cls, kwargs, name):
    with pytest.raises(MergelitError, match=name):
        cls(pool, **kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"threshold": 0}, "threshold"), ({"threshold": 101}, "threshold"), ({"threshold": -0.2}, "threshold"), ({"merge_func": "median"}, "merge_func")],
)
def test_ties_argument_validation(pool, kwargs, name):
    with pytest.raises(MergelitError, match=name):
        DareTiesMerging(pool, **kwargs)
    pretrained, finetuned = tiny_bodies()
    with pytest.raises(MergelitError, match=name):
        dare_ties_merge(pretrained, finetuned, **kwargs)


def test_defaults_and_hyperparameters(pool):
    ta = DareTaskArithmetic(pool)
    defaults = (ta.scaling_factor, ta.sparsity_ratio, ta.rescale, ta.seed, ta.only_conv1d_weights)
    assert defaults == (0.3, 0.5, True, 0, False)
    ties = DareTiesMerging(pool)
    assert (ties.scaling_factor, ties.threshold, ties.merge_func) == (0.5, 20, "sum")
    assert ties.hparams["seed"] == 0 and set(DareTiesMerging.symbols) <= set(ties.hparams)
    assert DareTaskArithmetic.display_name == "DARE + Task Arithmetic"
    assert ta.bodies_at_inference() == ties.bodies_at_inference() == 1.0
