"""Property-based tests (hypothesis) of every data-free method's merge over tiny random pools.

For random finite bodies and arguments drawn around each method's ``recommended`` ones:
- the merge is finite, and keeps the pretrained body's keys, shapes and dtypes;
- the inputs are not modified in place;
- when every fine-tuned body equals the pretrained one (all task vectors zero), every method gives
  the pretrained body back (each is θ0 + f(τ1..τn) with f(0, ..., 0) = 0);
- when every fine-tuned body is the same θ, the methods that average the bodies give θ back.

Data-driven methods (statistics, adaptation) and the ensemble (no merged body) are left to the
invariant suite (tests/test_invariants.py), which runs them end to end on the fixture pool.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config

from mergelit.methods import MergeMethod, method_classes
from mergelit.tasks import GLUE_TASKS, TASKS

N_EMBD, VOCAB, POSITIONS = 4, 11, 6
SHAPES = {
    "wte.weight": (VOCAB, N_EMBD),
    "wpe.weight": (POSITIONS, N_EMBD),
    "h.0.ln_1.weight": (N_EMBD,),
    "h.0.ln_1.bias": (N_EMBD,),
    "h.0.attn.c_attn.weight": (N_EMBD, 3 * N_EMBD),
    "h.0.attn.c_attn.bias": (3 * N_EMBD,),
    "h.0.attn.c_proj.weight": (N_EMBD, N_EMBD),
    "h.0.attn.c_proj.bias": (N_EMBD,),
    "h.0.ln_2.weight": (N_EMBD,),
    "h.0.ln_2.bias": (N_EMBD,),
    "h.0.mlp.c_fc.weight": (N_EMBD, 4 * N_EMBD),
    "h.0.mlp.c_fc.bias": (4 * N_EMBD,),
    "h.0.mlp.c_proj.weight": (4 * N_EMBD, N_EMBD),
    "h.0.mlp.c_proj.bias": (N_EMBD,),
    "ln_f.weight": (N_EMBD,),
    "ln_f.bias": (N_EMBD,),
}
# Fewer iterations for the iterative methods, so that 20 examples take seconds.
QUICK = {"iter_num": 5, "max_steps": 2}
# Methods whose merge of n equal bodies θ is θ (they average or elect the bodies themselves).
AVERAGES_EQUAL_BODIES = {"SimpleAverage", "Individual", "EMRMerging"}


class FakePool:
    """The pool API the data-free methods use, over given bodies (whole bodies, no streaming)."""

    def __init__(self, pretrained, finetuned, seed: int = 0):
        self.tasks = list(finetuned)
        self._pretrained = pretrained
        self._finetuned = finetuned
        generator = torch.Generator().manual_seed(seed)
        self._heads = {t: torch.randn(GLUE_TASKS[t].num_labels, N_EMBD, generator=generator) for t in self.tasks}
        self.pretrained_path = "fake"
        self.tokenizer_path = "fake"

    def pretrained_body(self):
        return self._pretrained

    def finetuned_body(self, task):
        return self._finetuned[task]

    def finetuned_bodies(self):
        return dict(self._finetuned)

    def head(self, task):
        return self._heads[task]

    def task_config(self, task):
        return GPT2Config(n_embd=N_EMBD, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS, pad_token_id=0,
                          num_labels=GLUE_TASKS[task].num_labels)

    def body_config(self):
        return GPT2Config(n_embd=N_EMBD, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS, pad_token_id=0)

    def keys(self):
        return list(SHAPES)

    def check(self):
        pass

    def fingerprint(self, task):
        return task


def data_free_methods():
    # Data-driven methods override ``prepare`` (statistics, adaptation); the ensemble merges nothing.
    return [cls for cls in method_classes() if cls.prepare is MergeMethod.prepare and cls.kind != "ensemble"]


METHODS = data_free_methods()


def make(cls, pool):
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {**cls.recommended, **{k: v for k, v in QUICK.items() if k in parameters}}
    if "task" in parameters and parameters["task"].default is inspect.Parameter.empty:
        kwargs.setdefault("task", pool.tasks[0])  # Individual: one fine-tuned model, scored on every task
    return cls(pool, **kwargs)


def merged_bodies(method):
    if method.kind == "task-aware":
        return {task: method.merge_task(task) for task in method.tasks}
    merged = method.merge()
    return {task: merged for task in method.tasks}


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
    copies = {t: {k: v.clone() for k, v in body.items()} for t, body in {"θ0": pretrained, **finetuned}.items()}
    for task, body in merged_bodies(make(cls, FakePool(pretrained, finetuned, spec["seed"]))).items():
        assert list(body) == list(pretrained), task
        for key, tensor in body.items():
            assert tensor.shape == pretrained[key].shape and tensor.dtype == pretrained[key].dtype, key
            assert torch.isfinite(tensor).all(), f"{cls.__name__}: non-finite {key} for {task}"
    for name, body in {"θ0": pretrained, **finetuned}.items():
        for key, tensor in body.items():
            assert torch.equal(tensor, copies[name][key]), f"{cls.__name__} modified {name}[{key}] in place"


@pytest.mark.parametrize("cls", METHODS, ids=[c.__name__ for c in METHODS])
@SETTINGS
@given(spec=pools)
def test_zero_task_vectors_give_the_pretrained_body(cls, spec):
    tasks = [t for t in TASKS if t in spec["tasks"]]
    pretrained = random_body(spec["seed"], spec["scale"])
    finetuned = {t: {k: v.clone() for k, v in pretrained.items()} for t in tasks}
    for task, body in merged_bodies(make(cls, FakePool(pretrained, finetuned, spec["seed"]))).items():
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
    for task, body in merged_bodies(make(cls, FakePool(pretrained, finetuned, spec["seed"]))).items():
        for key, tensor in body.items():
            torch.testing.assert_close(tensor, theta[key], rtol=1e-5, atol=1e-5)


def test_every_data_free_method_is_covered():
    names = {cls.__name__ for cls in METHODS}
    assert {"TaskArithmetic", "TiesMerging", "SimpleAverage"} <= names
    assert AVERAGES_EQUAL_BODIES <= names | {"EMRMerging"}
