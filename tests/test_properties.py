"""Property-based tests (hypothesis) of every data-free method's merge over tiny random pools.

For random finite bodies and arguments drawn around each method's ``recommended`` ones:
- the merge is finite, and keeps the pretrained body's keys, shapes and dtypes;
- the inputs are not modified in place;
- when every fine-tuned body equals the pretrained one (all task vectors zero), every method gives
  the pretrained body back (each is θ0 + f(τ1..τn) with f(0, ..., 0) = 0);
- when every fine-tuned body is the same θ, the methods that average the bodies give θ back.

Each example writes a real pool (safetensors) and merges it through ``ModelPool``, key by key, as a
run does. Data-driven methods (statistics, adaptation) and the ensemble (no merged body) are left to
the invariant suite (tests/test_invariants.py), which runs them end to end on the fixture pool.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import body_shapes, tiny_gpt2_config, write_state_pool

from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool
from mergelit.tasks import GLUE_TASKS, TASKS

CONFIG = tiny_gpt2_config(vocab_size=11, n_positions=6, n_embd=4, n_layer=1, n_head=2)
SHAPES = body_shapes(CONFIG)
# Methods whose merge of n equal bodies θ is θ (they average or elect the bodies themselves).
AVERAGES_EQUAL_BODIES = {"SimpleAverage", "Individual", "EMRMerging"}


def real_pool(pretrained, finetuned, seed: int) -> ModelPool:
    """A real pool (safetensors + config.json in a fresh folder) holding the given bodies."""
    return ModelPool(**write_state_pool(Path(tempfile.mkdtemp(prefix="property-pool-")), CONFIG, pretrained, finetuned, seed))


def data_free_methods():
    # Data-driven methods override ``prepare`` (statistics, adaptation); the ensemble merges nothing.
    return [cls for cls in method_classes() if cls.prepare is MergeMethod.prepare and cls.exportable]


METHODS = data_free_methods()


def make(cls, pool):
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {**cls.recommended, **cls.quick}
    if "task" in parameters and parameters["task"].default is inspect.Parameter.empty:
        kwargs.setdefault("task", pool.tasks[0])  # Individual: one fine-tuned model, scored on every task
    return cls(pool, **kwargs)


def merged_bodies(method):
    method.setup("test")
    return {task: method.body_for(task).state_dict() for task in method.tasks}


def random_body(seed: int, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


pools = st.fixed_dictionaries(
    {
        "tasks": st.lists(st.sampled_from(TASKS), min_size=1, max_size=3, unique=True),
        "seed": st.integers(0, 2**16),
        "scale": st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    }
)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("cls", METHODS, ids=[c.__name__ for c in METHODS])
@SETTINGS
@given(spec=pools)
def test_finite_inputs_give_a_finite_merge_with_the_same_keys_shapes_dtypes(cls, spec):
    tasks = [t for t in TASKS if t in spec["tasks"]]
    pretrained = random_body(spec["seed"])
    finetuned = {t: {k: v + spec["scale"] * torch.randn_like(v) for k, v in pretrained.items()} for t in tasks}
    pool = real_pool(pretrained, finetuned, spec["seed"])
    for task, body in merged_bodies(make(cls, pool)).items():
        assert list(body) == list(pretrained), task
        for key, tensor in body.items():
            assert tensor.shape == pretrained[key].shape and tensor.dtype == pretrained[key].dtype, key
            assert torch.isfinite(tensor).all(), f"{cls.__name__}: non-finite {key} for {task}"
    # Nothing written into the checkpoints the merge read.
    for key, tensor in pool.pretrained_body().items():
        assert torch.equal(tensor, pretrained[key]), key
    for task in tasks:
        for key, tensor in pool.finetuned_body(task).items():
            assert torch.equal(tensor, finetuned[task][key]), f"{cls.__name__} modified {task}[{key}]"


@pytest.mark.parametrize("cls", METHODS, ids=[c.__name__ for c in METHODS])
@SETTINGS
@given(spec=pools)
def test_zero_task_vectors_give_the_pretrained_body(cls, spec):
    tasks = [t for t in TASKS if t in spec["tasks"]]
    pretrained = random_body(spec["seed"], spec["scale"])
    finetuned = {t: {k: v.clone() for k, v in pretrained.items()} for t in tasks}
    for task, body in merged_bodies(make(cls, real_pool(pretrained, finetuned, spec["seed"]))).items():
        for key, tensor in body.items():
            torch.testing.assert_close(tensor, pretrained[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{cls.__name__} {task} {key}: {m}")


AVERAGING = [cls for cls in METHODS if cls.__name__ in AVERAGES_EQUAL_BODIES]


@pytest.mark.parametrize("cls", AVERAGING, ids=[c.__name__ for c in AVERAGING])
@SETTINGS
@given(spec=pools)
def test_equal_bodies_merge_to_that_body(cls, spec):
    tasks = [t for t in TASKS if t in spec["tasks"]]
    pretrained = random_body(spec["seed"])
    theta = random_body(spec["seed"] + 1, spec["scale"])
    finetuned = {t: {k: v.clone() for k, v in theta.items()} for t in tasks}
    for task, body in merged_bodies(make(cls, real_pool(pretrained, finetuned, spec["seed"]))).items():
        for key, tensor in body.items():
            torch.testing.assert_close(tensor, theta[key], rtol=1e-5, atol=1e-5)


def test_every_data_free_method_is_covered():
    names = {cls.__name__ for cls in METHODS}
    assert {"TaskArithmetic", "TiesMerging", "SimpleAverage"} <= names
    assert AVERAGES_EQUAL_BODIES <= names | {"EMRMerging"}
