"""The deterministic merges (Simple Average, Task Arithmetic, TIES) on hand-sized tensors.

Expected values are worked out by hand in the comments, not by re-running the maths.
Every value is a small dyadic number, so float32 arithmetic on them is exact.
"""

import math

import pytest
import torch
from conftest import write_integer_pool

from mergelit.methods.individual import Individual
from mergelit.methods.simple_average import SimpleAverage, simple_average_merge
from mergelit.methods.task_arithmetic import TaskArithmetic, task_arithmetic_merge
from mergelit.methods.ties import TiesMerging, ties_merge
from mergelit.pool import ModelPool
from mergelit.state_dict import flatten, unflatten


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def plus(body, tau):
    """θ0 + τ, key by key (builds a fine-tuned body from its task vector)."""
    return {key: body[key] + tau[key] for key in body}


def assert_state_dicts_equal(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"tensor {key!r}")


# ---- Simple Average ----------------------------------------------------------------------


def test_simple_average_is_the_mean_of_the_finetuned_bodies():
    finetuned = {
        "cola": {"w": t(2, 2), "b": t(3)},
        "mrpc": {"w": t(0, 4), "b": t(-1)},
        "rte": {"w": t(1, 0), "b": t(1)},
    }
    # w: ((2 + 0 + 1) / 3, (2 + 4 + 0) / 3) = (1, 2);  b: (3 − 1 + 1) / 3 = 1
    assert_state_dicts_equal(simple_average_merge(finetuned), {"w": t(1, 2), "b": t(1)})


# ---- Task Arithmetic ---------------------------------------------------------------------


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    pretrained = {"w": t(1, 2), "b": t(0.5)}
    finetuned = {
        "cola": {"w": t(2, 2), "b": t(1.5)},  # τ1: w (1, 0),  b 1
        "mrpc": {"w": t(0, 4), "b": t(0.5)},  # τ2: w (−1, 2), b 0
    }
    # Σ τ: w (0, 2), b 1.  θ0 + 0.5 Σ τ: w (1, 3), b 1.
    # (A mean of the task vectors would give w (1, 2.5), b 0.75.)
    merged = task_arithmetic_merge(pretrained, finetuned, scaling_factor=0.5)
    assert_state_dicts_equal(merged, {"w": t(1, 3), "b": t(1)})


# ---- TIES-Merging ------------------------------------------------------------------------
# Bodies have two tensors, "a" (2 entries) and "b" (2x2), flattened by key name: [a0, a1, b00, b01, b10, b11],
# d = 6. threshold 50: k = 6 − int(6 · 0.5) = 3, so each task keeps |τ| ≥ its 3rd-smallest |τ| (4 entries
# when there are no ties: FusionBench's k keeps one more than the percentage says).


def test_ties_trim_is_global_over_the_whole_body():
    pretrained = {"a": torch.zeros(2), "b": torch.zeros(2, 2)}
    tau = {"a": t(0.25, -0.5), "b": torch.tensor([[4.0, -3.0], [2.0, -1.0]])}
    # |τ| sorted: 0.25, 0.5, 1, 2, 3, 4 -> the 3rd smallest is 1: all of "b" stays, all of "a" goes
    # (trimming "a" on its own would have kept an entry). One task: the disjoint merge keeps what trim kept.
    merged = ties_merge(pretrained, {"cola": plus(pretrained, tau)}, scaling_factor=1.0, threshold=50)
    assert_state_dicts_equal(merged, {"a": t(0, 0), "b": torch.tensor([[4.0, -3.0], [2.0, -1.0]])})


def test_ties_trim_keeps_ties_at_the_cut():
    pretrained = {"a": torch.zeros(2), "b": torch.zeros(2, 2)}
    tau = {"a": t(0.25, -1), "b": torch.tensor([[3.0, -2.0], [1.0, 1.0]])}
    # |τ| sorted: 0.25, 1, 1, 1, 2, 3 -> the 3rd smallest is 1, and all three 1s are kept: 5 entries, not 4.
    merged = ties_merge(pretrained, {"cola": plus(pretrained, tau)}, scaling_factor=1.0, threshold=50)
    assert_state_dicts_equal(merged, {"a": t(0, -1), "b": torch.tensor([[3.0, -2.0], [1.0, 1.0]])})


# Three tasks, raw task vectors (flattened) and what the trim keeps (threshold 50, 3rd-smallest |τ| kept):
#   τ1 = [ 0.5,  2, -4,  3,   -1, -0.25]  |τ| 0.25 0.5 1 2 3 4   cut 1 -> T1 = [0,  2, -4, 3, -1,  0]
#   τ2 = [-0.5, -4, -2,  1,   -1,  3   ]  |τ| 0.5 1 1 2 3 4      cut 1 -> T2 = [0, -4, -2, 1, -1,  3] (tie: 5 kept)
#   τ3 = [ 0.25, 2,  1, -0.5, -1, -4   ]  |τ| 0.25 0.5 1 1 2 4   cut 1 -> T3 = [0,  2,  1, 0, -1, -4]
# Elect: Σ T = [0, 0, -5, 4, -3, -1] -> sign [0, 0, -1, +1, -1, -1]; Σ sign = -2, so the zeros take -1:
#   s = [-1, -1, -1, +1, -1, -1]. Position 0 was trimmed everywhere; position 1 cancels exactly (2 - 4 + 2).
# Disjoint merge, entries whose sign equals s, per position:
#   p0: none        p1: -4 (the two +2s disagree)   p2: -4, -2 (the +1 disagrees)
#   p3: 3, 1 (T3's trimmed 0 does not count)       p4: -1, -1, -1   p5: -4 (the +3 disagrees)
#   sum  τm = [0, -4, -6, 4, -3, -4]
#   mean τm = [0, -4, -3, 2, -1, -4]   (p3: 4 / 2 kept, not / 3 tasks; p0: 0 / clamp(0, 1))
#   max  τm = [0, -4, -4, 3, -1, -4]
# θ* = θ0 + 0.5 τm with θ0 = [1, 2, 0.5, -1, 2, 0]:
#   sum  [1, 0, -2.5,  1,   0.5, -2]
#   mean [1, 0, -1,    0,   1.5, -2]
#   max  [1, 0, -1.5,  0.5, 1.5, -2]
THREE_TASKS_THETA0 = {"a": t(1, 2), "b": torch.tensor([[0.5, -1.0], [2.0, 0.0]])}
THREE_TASKS_TAU = [
    {"a": t(0.5, 2), "b": torch.tensor([[-4.0, 3.0], [-1.0, -0.25]])},
    {"a": t(-0.5, -4), "b": torch.tensor([[-2.0, 1.0], [-1.0, 3.0]])},
    {"a": t(0.25, 2), "b": torch.tensor([[1.0, -0.5], [-1.0, -4.0]])},
]


@pytest.mark.parametrize(
    "merge_func, expected_flat",
    [
        ("sum", [1, 0, -2.5, 1, 0.5, -2]),
        ("mean", [1, 0, -1, 0, 1.5, -2]),
        ("max", [1, 0, -1.5, 0.5, 1.5, -2]),
    ],
)
def test_ties_three_tasks_trim_elect_disjoint_merge(merge_func, expected_flat):
    finetuned = {task: plus(THREE_TASKS_THETA0, tau) for task, tau in zip(["cola", "mrpc", "rte"], THREE_TASKS_TAU)}
    merged = ties_merge(THREE_TASKS_THETA0, finetuned, scaling_factor=0.5, threshold=50, merge_func=merge_func)
    expected = {"a": t(*expected_flat[:2]), "b": torch.tensor(expected_flat[2:]).view(2, 2)}
    assert_state_dicts_equal(merged, expected)


def test_ties_zero_sign_takes_the_majority_sign_positive():
    pretrained = {"w": torch.zeros(4)}
    # threshold 100 keeps everything. Σ τ = [0, 3, 4, -2] -> sign [0, +1, +1, -1], Σ sign = +1:
    # s = [+1, +1, +1, -1]. p0 keeps τ1's +1 and drops τ2's -1; the rest keep agreeing entries.
    # sum: [1, 2 + 1, 3 + 1, -1 - 1] = [1, 3, 4, -2]
    finetuned = {"cola": {"w": t(1, 2, 3, -1)}, "mrpc": {"w": t(-1, 1, 1, -1)}}
    merged = ties_merge(pretrained, finetuned, scaling_factor=1.0, threshold=100)
    assert_state_dicts_equal(merged, {"w": t(1, 3, 4, -2)})


def test_ties_zero_sign_with_no_majority_keeps_nothing_there():
    pretrained = {"w": torch.zeros(4)}
    # Σ τ = [0, 3, -2, 0] -> sign [0, +1, -1, 0], Σ sign = 0: the zeros stay 0, and no entry has sign 0.
    # sum: [0, 2 + 1, -1 - 1, 0] = [0, 3, -2, 0]. (FusionBench would keep the negative entries where s = 0;
    # the spec keeps entries whose sign equals s. Only an exactly balanced Σ sign tells them apart.)
    finetuned = {"cola": {"w": t(1, 2, -1, 2)}, "mrpc": {"w": t(-1, 1, -1, -2)}}
    merged = ties_merge(pretrained, finetuned, scaling_factor=1.0, threshold=100)
    assert_state_dicts_equal(merged, {"w": t(0, 3, -2, 0)})


def test_ties_smallest_threshold_keeps_only_the_largest_entries():
    pretrained = {"w": torch.zeros(5)}
    # threshold 1.5 (%) on d = 5: int(5 · 0.015) = 0, k = 5: keep |τ| ≥ the largest |τ| (3), both tied 3s.
    finetuned = {"cola": {"w": t(1, -3, 2, 3, -0.5)}}
    merged = ties_merge(pretrained, finetuned, scaling_factor=1.0, threshold=1.5)
    assert_state_dicts_equal(merged, {"w": t(0, -3, 0, 3, 0)})


def test_ties_threshold_at_most_one_is_a_fraction_as_in_fusionbench():
    pretrained = {"w": torch.zeros(5)}
    finetuned = {"cola": {"w": t(1, -3, 2, 3, -0.5)}}
    # 0.4 is 40 %: int(5 · 0.4) = 2 kept by magnitude, k = 3: |τ| ≥ the 3rd smallest (2): 2, 3 and -3 kept.
    assert_state_dicts_equal(ties_merge(pretrained, finetuned, 1.0, threshold=0.4), {"w": t(0, -3, 2, 3, 0)})
    assert_state_dicts_equal(ties_merge(pretrained, finetuned, 1.0, threshold=0.4), ties_merge(pretrained, finetuned, 1.0, threshold=40))
    # 1 is the whole (100 %), not 1 %.
    assert_state_dicts_equal(ties_merge(pretrained, finetuned, 1.0, threshold=1), {"w": t(1, -3, 2, 3, -0.5)})


# ---- the state-dict helpers the merges rely on ---------------------------------------------


def test_flatten_sorts_keys_by_name_and_unflatten_inverts_it():
    body = {"h.1.w": t(3), "h.0.w": torch.tensor([[1.0, 2.0]]), "ln_f.b": t(4, 5)}
    vector = flatten(body)
    assert vector.tolist() == [1, 2, 3, 4, 5]  # h.0.w, h.1.w, ln_f.b
    assert_state_dicts_equal(unflatten(vector, body), body)


# ---- invariants, over every pure function ----------------------------------------------


def random_body(seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"wte.weight": (11, 4), "h.0.attn.c_attn.weight": (4, 12), "h.0.attn.c_attn.bias": (12,), "ln_f.weight": (4,)}
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


MERGES = {
    "simple_average": lambda pretrained, finetuned: simple_average_merge(finetuned),
    "task_arithmetic": lambda pretrained, finetuned: task_arithmetic_merge(pretrained, finetuned, 0.3),
    "ties_sum": lambda pretrained, finetuned: ties_merge(pretrained, finetuned),
    "ties_mean": lambda pretrained, finetuned: ties_merge(pretrained, finetuned, merge_func="mean"),
    "ties_max": lambda pretrained, finetuned: ties_merge(pretrained, finetuned, merge_func="max"),
}


@pytest.mark.parametrize("merge", MERGES.values(), ids=MERGES.keys())
def test_merge_keeps_keys_shapes_dtype_and_leaves_inputs_alone(merge):
    pretrained = random_body(0)
    finetuned = {task: random_body(seed) for seed, task in enumerate(["cola", "mnli", "mrpc"], start=1)}
    copies = {task: {k: v.clone() for k, v in body.items()} for task, body in finetuned.items()}
    pretrained_copy = {k: v.clone() for k, v in pretrained.items()}

    merged = merge(pretrained, finetuned)

    assert list(merged) == list(pretrained)
    for key, tensor in merged.items():
        assert tensor.shape == pretrained[key].shape and tensor.dtype == torch.float32, key
    # The pool hands out its cached tensors: a merge must not write into them.
    assert_state_dicts_equal(pretrained, pretrained_copy)
    for task in finetuned:
        assert_state_dicts_equal(finetuned[task], copies[task])


def one_task_merges_to_itself():
    return {
        "simple_average": lambda pretrained, finetuned: simple_average_merge(finetuned),
        "task_arithmetic_lambda_1": lambda pretrained, finetuned: task_arithmetic_merge(pretrained, finetuned, 1.0),
        **{
            f"ties_{func}_threshold_100_lambda_1": (
                lambda pretrained, finetuned, func=func: ties_merge(pretrained, finetuned, 1.0, 100, func)
            )
            for func in ("sum", "mean", "max")
        },
    }


@pytest.mark.parametrize("merge", one_task_merges_to_itself().values(), ids=one_task_merges_to_itself().keys())
def test_one_finetuned_model_merges_to_itself(merge):
    pretrained, body = random_body(0), random_body(1)
    merged = merge(pretrained, {"cola": body})
    for key in body:  # θ0 + (θ1 − θ0) is θ1 up to float rounding
        torch.testing.assert_close(merged[key], body[key], msg=f"tensor {key!r}")


def test_average_of_identical_bodies_is_the_body():
    body = random_body(1)
    merged = simple_average_merge({task: body for task in ["cola", "mnli", "mrpc"]})
    for key in body:
        torch.testing.assert_close(merged[key], body[key], msg=f"tensor {key!r}")


@pytest.mark.parametrize(
    "merge",
    [
        lambda pretrained, finetuned: task_arithmetic_merge(pretrained, finetuned, 0.0),
        lambda pretrained, finetuned: ties_merge(pretrained, finetuned, scaling_factor=0.0),
    ],
    ids=["task_arithmetic", "ties"],
)
def test_lambda_zero_gives_the_pretrained_body(merge):
    pretrained = random_body(0)
    merged = merge(pretrained, {"cola": random_body(1), "mnli": random_body(2)})
    assert_state_dicts_equal(merged, pretrained)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, -5, 100.5, math.nan])
def test_ties_rejects_threshold_outside_0_100(threshold):
    pretrained = random_body(0)
    with pytest.raises(ValueError, match=rf"threshold.*\(0, 100\].*got {threshold}"):
        ties_merge(pretrained, {"cola": random_body(1)}, threshold=threshold)


def test_ties_rejects_unknown_merge_func():
    with pytest.raises(ValueError, match="merge_func must be one of sum, mean, max; got 'median'"):
        ties_merge(random_body(0), {"cola": random_body(1)}, merge_func="median")


@pytest.mark.parametrize("scaling_factor", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "merge",
    [
        lambda pretrained, finetuned, scaling_factor: task_arithmetic_merge(pretrained, finetuned, scaling_factor),
        lambda pretrained, finetuned, scaling_factor: ties_merge(pretrained, finetuned, scaling_factor),
    ],
    ids=["task_arithmetic", "ties"],
)
def test_non_finite_scaling_factor_is_rejected(merge, scaling_factor):
    with pytest.raises(ValueError, match=rf"scaling_factor.*finite.*got {scaling_factor}"):
        merge(random_body(0), {"cola": random_body(1)}, scaling_factor)


@pytest.mark.parametrize("merge", MERGES.values(), ids=MERGES.keys())
def test_mismatched_bodies_are_rejected_naming_task_and_key(merge):
    pretrained = random_body(0)
    wrong_shape = random_body(2)
    wrong_shape["ln_f.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'ln_f\.weight' of the fine-tuned body 'mnli'.* shape \(5,\), expected \(4,\)"):
        merge(pretrained, {"cola": random_body(1), "mnli": wrong_shape})
    missing_key = random_body(2)
    del missing_key["wte.weight"]
    with pytest.raises(ValueError, match=r"mnli.*no tensor 'wte\.weight'"):
        merge(pretrained, {"cola": random_body(1), "mnli": missing_key})


@pytest.mark.parametrize("merge", MERGES.values(), ids=MERGES.keys())
def test_no_finetuned_bodies_is_rejected(merge):
    with pytest.raises(ValueError, match="at least one task"):
        merge(random_body(0), {})


# ---- the thin classes validate in __init__, before anything is loaded ----------------------


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """A real two-task pool (tiny GPT-2, integer-valued weights) the classes read tensor by tensor."""
    return ModelPool(**write_integer_pool(tmp_path_factory.mktemp("pool"), seed=5, tasks=("cola", "rte")))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda pool: TaskArithmetic(pool, scaling_factor=math.nan), "scaling_factor"),
        (lambda pool: TiesMerging(pool, scaling_factor=math.inf), "scaling_factor"),
        (lambda pool: TiesMerging(pool, threshold=0), r"threshold.*got 0"),
        (lambda pool: TiesMerging(pool, merge_func="median"), "merge_func"),
        (lambda pool: Individual(pool, task="wnli"), r"'wnli' is not in the pool; choose one of cola, rte"),
    ],
)
def test_methods_reject_bad_configuration_at_construction(make, match, small_pool):
    with pytest.raises(ValueError, match=match):
        make(small_pool)


def test_methods_merge_the_pools_bodies(small_pool):
    pool = small_pool
    bodies, theta0 = pool.finetuned_bodies(), pool.pretrained_body()
    assert_state_dicts_equal(SimpleAverage(pool).merge(), simple_average_merge(bodies))
    assert_state_dicts_equal(TaskArithmetic(pool, scaling_factor=0.5).merge(), task_arithmetic_merge(theta0, bodies, 0.5))
    assert_state_dicts_equal(TiesMerging(pool, 0.6, 30, "mean").merge(), ties_merge(theta0, bodies, 0.6, 30, "mean"))
    assert_state_dicts_equal(Individual(pool, task="rte").merge(), bodies["rte"])
