"""WUDI: its special cases, FusionBench's formula bit for bit, the Gram-form gradient against it, the
side it acts on, the closed form, the tensors it does not optimise, and where it runs."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import mergelit.methods.wudi as wudi_module
from mergelit.errors import MergelitError
from mergelit.linalg import TaskVectors
from mergelit.methods.wudi import (
    WUDIMerging,
    interference_loss,
    minimise_interference_adam,
    minimise_interference_closed_form,
    gram_applies,
    minimise_interference_gram,
    wudi_merge,
)
from mergelit.pool import ModelPool
from mergelit.synthetic import write_pool

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


def gradient_of(loss_fn, tau):
    tau = tau.detach().double().requires_grad_(True)
    loss_fn(tau).backward()
    return tau.grad


GRADIENT_TOLERANCE = 1e-6
"""How far (absolute) the Gram form's merged weights may be from FusionBench's autograd iterates after
400 steps at lr 1e-5 (measured: 8.2e-8 on the fixtures, 8.4e-9 on a GPT-2-small c_fc; benchmarks/wudi_gram.py)."""


# ---- special cases -------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["gram", "autograd"])
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_zero_steps_give_the_sum_on_2d_keys_and_the_mean_elsewhere(side, gradient):
    pretrained, finetuned = make_pool(dyadic=True)  # sums exact in any order
    merged = wudi_merge(pretrained, finetuned, iter_num=0, side=side, gradient=gradient, progress=False)
    for key, base in pretrained.items():
        summed = torch.sum(stacked_task_vectors(pretrained, finetuned, key), dim=0)
        expected = base + summed if key in TWO_D else base + summed / 3
        assert torch.equal(merged[key], expected), key


@pytest.mark.parametrize("solver, gradient", [("adam", "gram"), ("adam", "autograd"), ("closed_form", "gram")])
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_one_task_gives_its_own_body(side, solver, gradient):
    pretrained, finetuned = make_pool(n_tasks=1, dyadic=True)
    merged = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, side=side, solver=solver, gradient=gradient, progress=False)
    for key in pretrained:
        if solver == "adam":  # zero gradient (the Gram form: (τ − τ0) A + C0 with τ = τ0 and C0 = 0): Adam does not move
            assert torch.equal(merged[key], finetuned["a"][key]), key
        else:  # τ1 G1 (G1)⁺ = τ1, up to the float64 solve's rounding
            torch.testing.assert_close(merged[key], finetuned["a"][key], rtol=1e-6, atol=1e-6)


def test_matches_fusionbench_formula_bit_for_bit():
    pretrained, finetuned = make_pool()
    merged = wudi_merge(pretrained, finetuned, iter_num=30, lr=1e-2, side="fusionbench", gradient="autograd", progress=False)
    expected = fusionbench_reference(pretrained, finetuned, iter_num=30, lr=1e-2)
    start = wudi_merge(pretrained, finetuned, iter_num=0, side="fusionbench", gradient="autograd", progress=False)
    for key in pretrained:
        assert torch.equal(merged[key], expected[key]), key
    # The steps did move the 2-D tensors (the comparison is not of two starting points).
    assert all((merged[key] - start[key]).abs().max() > 1e-2 for key in TWO_D)


# ---- the Gram form ---------------------------------------------------------------------------
def test_the_gram_form_takes_the_tensors_where_it_saves_work():
    # [a, b] as optimised: A is [b, b]; the stacked task vectors n·a·b.
    assert gram_applies((3072, 768), 7) and gram_applies((768, 3072), 7)  # GPT-2's c_fc, c_proj (input side)
    assert gram_applies((768, 1024), 7) and gram_applies((50257, 768), 7)  # wpe (input), wte (FusionBench's side)
    assert not gram_applies((768, 50257), 7)  # wte on the input side: autograd's order (and bits)
    assert gram_applies((4, 12), 3) and not gram_applies((4, 12), 2)


# make_pool's keys with 3 tasks all take the Gram form; with 2, wte on the input side ([4, 11] as
# optimised) and c_attn on FusionBench's ([4, 12]) keep the autograd path, bit for bit.
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_gram_form_follows_fusionbenchs_iterates(side, n_tasks):
    pretrained, finetuned = make_pool(n_tasks=n_tasks)
    reference = wudi_merge(pretrained, finetuned, iter_num=400, side=side, gradient="autograd", progress=False)
    gram = wudi_merge(pretrained, finetuned, iter_num=400, side=side, gradient="gram", progress=False)
    start = wudi_merge(pretrained, finetuned, iter_num=0, side=side, gradient="autograd", progress=False)
    for key in pretrained:
        torch.testing.assert_close(gram[key], reference[key], rtol=0, atol=GRADIENT_TOLERANCE, msg=key)
        shape = pretrained[key].shape[::-1] if side == "input" else pretrained[key].shape
        if key in TWO_D and not gram_applies(shape, n_tasks):
            assert torch.equal(gram[key], reference[key]), key
    # 400 steps of lr 1e-5 moved every 2-D tensor by ~4e-3: 4000 times the tolerance.
    assert all((reference[key] - start[key]).abs().max() > 3e-3 for key in TWO_D)


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("side", ["input", "fusionbench"])
def test_gram_form_gradient_is_the_losss_gradient(side, n_tasks):
    # A few large steps (lr 1e-2 moves each entry ~1e-2 a step): a wrong gradient would send Adam elsewhere.
    pretrained, finetuned = make_pool(n_tasks=n_tasks)
    reference = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, side=side, gradient="autograd", progress=False)
    gram = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, side=side, gradient="gram", progress=False)
    for key in TWO_D:
        torch.testing.assert_close(gram[key], reference[key], rtol=0, atol=1e-5, msg=key)


def test_gram_form_reads_each_task_vector_twice_and_one_at_a_time():
    pretrained, finetuned = make_pool()
    key = "h.0.attn.c_attn.weight"
    reads = []

    class Thetas(list):
        def __getitem__(self, index):
            reads.append(index)
            return list.__getitem__(self, index)

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    thetas = Thetas(body[key] for body in finetuned.values())
    minimise_interference_gram(TaskVectors(pretrained[key], thetas, transpose=True), 3, 1e-5)
    assert reads == [0, 1, 2, 0, 1, 2]  # pass 1: Σ τi, norms; pass 2: the Gram sums


def test_input_columns_no_task_changed_stay_and_the_rest_follows_the_iterates():
    # wpe rows 3..5 (positions no task's text reached): every τi is 0 there, so is the gradient.
    pretrained, finetuned = make_pool()
    for body in finetuned.values():
        body["wpe.weight"][3:] = pretrained["wpe.weight"][3:]
    gram = wudi_merge(pretrained, finetuned, iter_num=400, gradient="gram", progress=False)
    reference = wudi_merge(pretrained, finetuned, iter_num=400, gradient="autograd", progress=False)
    assert torch.equal(gram["wpe.weight"][3:], pretrained["wpe.weight"][3:])
    assert torch.equal(reference["wpe.weight"][3:], pretrained["wpe.weight"][3:])
    torch.testing.assert_close(gram["wpe.weight"], reference["wpe.weight"], rtol=0, atol=GRADIENT_TOLERANCE)


# ---- the tensors not optimised ---------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["gram", "autograd"])
def test_others_pretrained_leaves_the_other_tensors_at_theta0(gradient):
    pretrained, finetuned = make_pool()
    args = dict(iter_num=5, lr=1e-2, gradient=gradient, exclude_keys=["wpe.weight"], progress=False)
    mean = wudi_merge(pretrained, finetuned, **args)
    paper = wudi_merge(pretrained, finetuned, **args, others="pretrained")
    for key in pretrained:
        if key in TWO_D and key != "wpe.weight":  # optimised: the same bits either way
            assert torch.equal(paper[key], mean[key]), key
        else:  # 1-D tensors and the excluded wpe: θ0 (the paper's code), not θ0 + mean τi (FusionBench)
            assert torch.equal(paper[key], pretrained[key]), key
            assert not torch.allclose(mean[key], pretrained[key]), key


# ---- which side ------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["gram", "autograd"])
def test_input_side_is_fusionbench_formula_on_the_transpose(gradient):
    """Conv1D / embeddings are [in, out]; the input side is FusionBench's formula on Wᵀ ([out, in])."""
    pretrained, finetuned = make_pool()
    args = dict(iter_num=20, lr=1e-2, gradient=gradient, progress=False)
    ours = wudi_merge(pretrained, finetuned, side="input", **args)
    on_transpose = wudi_merge(
        transposed(pretrained), {task: transposed(body) for task, body in finetuned.items()}, side="fusionbench", **args
    )
    stored_side = wudi_merge(pretrained, finetuned, side="fusionbench", **args)
    for key in pretrained:  # the same operations on the same numbers
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
    paper = gradient_of(lambda t: input_side_loss(t, stacked), tau)
    assert paper.norm() < 1e-5 * gradient_of(lambda t: input_side_loss(t, stacked), start).norm()
    stored = gradient_of(lambda t: interference_loss(t, stacked, norms), tau)
    assert stored.norm() > 1e-2 * gradient_of(lambda t: interference_loss(t, stacked, norms), start).norm()


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
    assert gradient_of(loss, tau).norm() < 1e-5 * gradient_of(loss, vectors.sum(0)).norm()
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


def test_autograd_refuses_fusionbench_sides_gpt2_wte_and_names_the_fixes():
    shapes = {"wte.weight": (50257, 2), "h.0.ln_1.weight": (2,)}
    pretrained = {k: torch.zeros(s) for k, s in shapes.items()}
    finetuned = {t: {k: torch.full(s, float(i + 1)) for k, s in shapes.items()} for i, t in enumerate("ab")}
    # The [2, 50257, 50257] product (20 GiB) the autograd path and the closed form would stack.
    for solver in ("adam", "closed_form"):
        with pytest.raises(MergelitError, match=r"exclude_keys: \[wte\.weight\]") as error:
            wudi_merge(pretrained, finetuned, side="fusionbench", solver=solver, gradient="autograd", progress=False)
        assert ("gradient: gram" in str(error.value)) == (solver == "adam")
    # FusionBench's own workaround: wte then gets θ0 + mean τ.
    merged = wudi_merge(pretrained, finetuned, side="fusionbench", gradient="autograd", exclude_keys=["wte.weight"], progress=False)
    assert torch.equal(merged["wte.weight"], torch.full((50257, 2), 1.5))
    # The Gram form's A is [2, 2] there: it runs. τ1 = 1, τ2 = 2 everywhere: every row of every τi is
    # the same, so the loss only sees Σ rows; Adam starts at Σ τi = 3 and moves down towards the minimiser.
    merged = wudi_merge(pretrained, finetuned, iter_num=3, side="fusionbench", progress=False)["wte.weight"]
    assert torch.isfinite(merged).all() and bool((merged < 3).all()) and bool((merged > 3 - 4e-5).all())


def test_excluded_keys_get_the_mean():
    pretrained, finetuned = make_pool(dyadic=True)  # the mean's sum is exact in any order
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


@pytest.mark.parametrize("gradient", ["gram", "autograd"])
def test_runs_under_inference_mode(gradient):
    """Lightning may call setup under torch.inference_mode: the Adam steps must still record."""
    pretrained, finetuned = make_pool()
    expected = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, gradient=gradient, progress=False)
    with torch.inference_mode():
        merged = wudi_merge(pretrained, finetuned, iter_num=5, lr=1e-2, gradient=gradient, progress=False)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


# ---- the method on a real pool -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> ModelPool:
    """Three fine-tuned GPT-2s, 1 layer, 8 wide (wte [50257, 8]), written as safetensors checkpoints."""
    paths = write_pool(tmp_path_factory.mktemp("wudi_pool"), seed=4, tasks=("cola", "mrpc", "rte"), n_layer=1, n_embd=8, n_head=2)
    return ModelPool(**paths)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"gradient": "autograd"},
        {"side": "fusionbench", "exclude_keys": ["wte.weight"], "others": "pretrained"},
        {"solver": "closed_form", "exclude_keys": ["wpe.weight"]},
    ],
)
def test_the_key_by_key_merge_equals_the_whole_body_function(pool, kwargs):
    kwargs = {**WUDIMerging.quick, **kwargs}
    merged = WUDIMerging(pool, **kwargs).merge()
    expected = wudi_merge(pool.pretrained_body(), pool.finetuned_bodies(), progress=False, **kwargs)
    assert list(merged) == list(pool.keys())
    for key in expected:
        assert torch.equal(merged[key].view(torch.int32), expected[key].view(torch.int32)), key


@pytest.mark.parametrize("side, exclude_keys", [("input", []), ("fusionbench", ["wte.weight"])])
def test_gram_form_follows_fusionbenchs_iterates_on_a_pool(pool, side, exclude_keys):
    args = dict(iter_num=400, side=side, exclude_keys=exclude_keys)
    gram = WUDIMerging(pool, **args).merge()
    reference = WUDIMerging(pool, **args, gradient="autograd").merge()
    for key in gram:
        torch.testing.assert_close(gram[key], reference[key], rtol=0, atol=GRADIENT_TOLERANCE, msg=key)


def test_quick_budget_and_defaults(pool):
    method = WUDIMerging(pool)
    assert WUDIMerging.quick == {"iter_num": 20}
    assert (method.iter_num, method.lr, method.side, method.solver, method.gradient, method.others) == (
        400, 1e-5, "input", "adam", "gram", "mean",
    )
    assert method.reusable_key() is None  # no λ: nothing a sweep could reuse


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iter_num": -1}, "iter_num"),
        ({"iter_num": 2.5}, "iter_num"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"side": "output"}, "side"),
        ({"solver": "sgd"}, "solver"),
        ({"gradient": "exact"}, "gradient"),
        ({"others": "zero"}, "others"),
    ],
)
def test_bad_arguments_are_refused(pool, kwargs, match):
    pretrained, finetuned = make_pool()
    with pytest.raises(MergelitError, match=match):
        WUDIMerging(pool, **kwargs)
    with pytest.raises(MergelitError, match=match):
        wudi_merge(pretrained, finetuned, progress=False, **kwargs)


def test_unknown_excluded_key_is_refused(pool):
    pretrained, finetuned = make_pool()
    with pytest.raises(MergelitError, match="wte_typo"):
        wudi_merge(pretrained, finetuned, exclude_keys=["wte_typo"], progress=False)
    with pytest.raises(MergelitError, match="wte_typo"):
        WUDIMerging(pool, exclude_keys=["wte_typo"]).merge()


# ---- where it runs ---------------------------------------------------------------------------------
def fake_trainer(device: str) -> SimpleNamespace:
    """What ``merge_device`` reads of a Trainer: its strategy's root device."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


def test_the_merge_runs_on_the_trainers_device(pool, monkeypatch):
    method = WUDIMerging(pool, iter_num=3)
    assert method.merge_device() == torch.device("cpu")  # not attached to a Trainer
    method.trainer = fake_trainer("cuda:1")
    assert method.merge_device() == torch.device("cuda:1")
    # Every optimisation is handed that device (the spies run it on the CPU, where this test runs).
    seen = []
    for name in ("minimise_interference_gram", "minimise_interference_adam"):
        real = getattr(wudi_module, name)

        def spy(task_vectors, iter_num, lr, device=None, real=real):
            seen.append(device)
            return real(task_vectors, iter_num, lr, "cpu")

        monkeypatch.setattr(wudi_module, name, spy)
    for gradient in ("gram", "autograd"):
        method = WUDIMerging(pool, iter_num=3, gradient=gradient)
        method.trainer = fake_trainer("cuda:1")
        merged = method.merge()
        assert all(tensor.device == torch.device("cpu") for tensor in merged.values())
    two_d = sum(len(shape) == 2 for shape in pool.body_shapes().values())
    assert seen == [torch.device("cuda:1")] * (2 * two_d)


def test_an_attached_cpu_trainer_merges_on_the_cpu(pool):
    import lightning as L

    method = WUDIMerging(pool, iter_num=3)
    method.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert method.merge_device() == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merges_on_a_gpu_trainer_and_returns_cpu_tensors(pool):
    import lightning as L

    on_cpu = WUDIMerging(pool, iter_num=20).merge()
    for gradient in ("gram", "autograd"):
        method = WUDIMerging(pool, iter_num=20, gradient=gradient)
        method.trainer = L.Trainer(accelerator="cuda", devices=1, logger=False, enable_progress_bar=False)
        assert method.merge_device().type == "cuda"
        merged = method.merge()
        for key, tensor in merged.items():
            assert tensor.device == torch.device("cpu"), key
            torch.testing.assert_close(tensor, on_cpu[key], rtol=0, atol=1e-5, msg=key)
