"""EMR-Merging: the spec's worked example and invariants (whole-body functions), the streamed parts
and per-task bodies against them bit for bit, bit-packed masks, one body at a time."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import yaml

from mergelit import costs
from mergelit.errors import KeyMissing
from mergelit.methods.emr import EMRMerging, elect_sign, emr_merge, emr_parts, modulated_body
from mergelit.pool import ModelPool
from mergelit.state_dict import pack_bits, unpack_bits
from mergelit.synthetic import write_pool

SHAPES = {
    "wte.weight": (11, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
}


def hand_bodies(n_tasks: int = 3, seed: int = 0, dyadic: bool = False):
    """θ0 and θi by hand. ``dyadic``: multiples of 1/8, so θ0 + (θi − θ0) == θi exactly."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        if dyadic:
            return torch.randint(-16, 17, shape, generator=generator).float() / 8
        return torch.randn(shape, generator=generator) * scale

    pretrained = {key: draw(shape, 1.0) for key, shape in SHAPES.items()}
    finetuned = {task: {k: pretrained[k] + draw(s, 0.1) for k, s in SHAPES.items()} for task in "abc"[:n_tasks]}
    return pretrained, finetuned


def emr_reference(pretrained, finetuned):
    """The spec's section 5, line by line (one flat pass per key; float32 sums in key order)."""
    tasks = list(finetuned)
    tau = {t: {k: finetuned[t][k] - pretrained[k] for k in pretrained} for t in tasks}
    flag = {k: 2 * (sum(tau[t][k] for t in tasks) > 0).long() - 1 for k in pretrained}
    masks = {t: {k: tau[t][k] * flag[k] > 0 for k in pretrained} for t in tasks}
    tau_uni = {k: flag[k] * torch.stack([(masks[t][k] * tau[t][k]).abs() for t in tasks]).amax(0) for k in pretrained}
    rescalers = {}
    for t in tasks:
        numerator = torch.zeros(())
        denominator = torch.zeros(())
        for k in pretrained:
            numerator += tau[t][k].abs().mean()
            denominator += (masks[t][k] * tau_uni[k]).abs().mean()
        rescalers[t] = float(numerator / denominator)
    return tau_uni, masks, rescalers


def test_the_specs_worked_example():
    theta0 = torch.tensor([0.5, -1.0, 2.0])
    pretrained = {"w": theta0}
    tau1, tau2 = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 3.0, -2.0])
    finetuned = {"a": {"w": theta0 + tau1}, "b": {"w": theta0 + tau2}}
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    assert torch.equal(elect_sign([tau1, tau2]), torch.tensor([1.0, 1.0, -1.0]))
    assert masks["a"]["w"].tolist() == [True, False, False]
    assert masks["b"]["w"].tolist() == [True, True, True]
    assert masks["a"]["w"].dtype == torch.bool
    assert torch.equal(tau_uni["w"], torch.tensor([2.0, 3.0, -2.0]))
    assert rescalers["a"] == pytest.approx(1.5, rel=1e-6)
    assert rescalers["b"] == pytest.approx(6 / 7, rel=1e-6)
    body_a = modulated_body(pretrained, tau_uni, masks["a"], rescalers["a"])
    body_b = modulated_body(pretrained, tau_uni, masks["b"], rescalers["b"])
    torch.testing.assert_close(body_a["w"], theta0 + torch.tensor([3.0, 0.0, 0.0]))
    torch.testing.assert_close(body_b["w"], theta0 + 6 / 7 * torch.tensor([2.0, 3.0, -2.0]))


def test_matches_the_specs_formulas_on_random_tensors():
    pretrained, finetuned = hand_bodies()
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    expected_uni, expected_masks, expected_rescalers = emr_reference(pretrained, finetuned)
    assert all(torch.equal(tau_uni[k], expected_uni[k]) for k in pretrained)
    assert all(torch.equal(masks[t][k], expected_masks[t][k]) for t in finetuned for k in pretrained)
    assert rescalers == expected_rescalers


def test_one_task_gives_its_own_body(tmp_path):
    pretrained, finetuned = hand_bodies(n_tasks=1, dyadic=True)
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    assert rescalers == {"a": 1.0}
    body = modulated_body(pretrained, tau_uni, masks["a"], rescalers["a"])
    assert all(torch.equal(body[k], finetuned["a"][k]) for k in pretrained)
    # On a real one-task pool: r = 1 exactly and the body is θ0 + (θ1 − θ0), θ1 up to its rounding.
    pool = ModelPool(**write_pool(tmp_path, tasks=["rte"], n_layer=1, n_embd=32, n_head=2))
    method = EMRMerging(pool)
    assert method.parts()[2] == {"rte": 1.0}
    state = method.body_for("rte").state_dict()
    for key in pool.keys():
        theta0, theta1 = pool.pretrained_tensor(key), pool.finetuned_tensor("rte", key)
        assert torch.equal(state[key], theta0 + (theta1 - theta0)), key
        torch.testing.assert_close(state[key], theta1, rtol=0, atol=1e-6)


def test_entries_no_task_changed_stay_at_theta0():
    pretrained, finetuned = hand_bodies()
    key = "h.0.attn.c_attn.weight"
    untouched = torch.zeros(SHAPES[key], dtype=torch.bool)
    untouched[1, 3:7] = True
    for body in finetuned.values():
        body[key] = torch.where(untouched, pretrained[key], body[key])
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    for task in finetuned:
        body = modulated_body(pretrained, tau_uni, masks[task], rescalers[task])[key]
        assert torch.equal(body[untouched], pretrained[key][untouched]), task
        assert not torch.equal(body[~untouched], pretrained[key][~untouched]), task


def test_rescaler_sums_per_tensor_means_not_the_global_ratio():
    # Tensors of sizes 4 and 1. γ: x = [+,+,+,+], y = −. M1 keeps x[0] only, M2 everything;
    # τuni = x [4, 1, 1, 1], y [−3].
    pretrained = {"x": torch.zeros(4), "y": torch.zeros(1)}
    finetuned = {
        "a": {"x": torch.tensor([4.0, 0.0, 0.0, 0.0]), "y": torch.tensor([1.0])},
        "b": {"x": torch.tensor([1.0, 1.0, 1.0, 1.0]), "y": torch.tensor([-3.0])},
    }
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    assert torch.equal(tau_uni["x"], torch.tensor([4.0, 1.0, 1.0, 1.0]))
    assert torch.equal(tau_uni["y"], torch.tensor([-3.0]))
    # r1 = (mean|x1| + mean|y1|) / (mean|M1 τuni,x| + mean|M1 τuni,y|) = (1 + 1) / (1 + 0) = 2;
    # the global ratio Σ|τ1| / Σ|M1 ⊙ τuni| would be 5 / 4.
    assert rescalers["a"] == pytest.approx(2.0, rel=1e-7)
    # r2 = (1 + 3) / (7/4 + 3) = 16/19; globally (4 + 3) / (7 + 3) = 0.7.
    assert rescalers["b"] == pytest.approx(16 / 19, rel=1e-6)


def test_a_task_with_no_agreeing_entry_keeps_theta0():
    pretrained = {"w": torch.tensor([1.0, 2.0])}
    finetuned = {"a": {"w": torch.tensor([1.0, 2.0])}, "b": {"w": torch.tensor([1.5, 2.5])}}  # τa = 0
    _, masks, rescalers = emr_merge(pretrained, finetuned)
    assert not masks["a"]["w"].any() and rescalers["a"] == 1.0
    tau_uni = emr_merge(pretrained, finetuned)[0]
    assert torch.equal(modulated_body(pretrained, tau_uni, masks["a"], rescalers["a"])["w"], pretrained["w"])


# ---- the method over a real pool: streamed parts, bit-packed masks, one body at a time -------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture
def pool(pool_paths) -> ModelPool:
    """The tiny real pool (7 tasks, 2 layers, 64 wide), read tensor by tensor."""
    return ModelPool(**pool_paths)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (9,), (3, 5), (2, 3, 11), (64, 192)])
def test_bit_pack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(mask.numel() / 8),)
    unpacked = unpack_bits(packed, shape)
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)
    # 8 entries a byte, the first entry in the highest bit (numpy's packbits).
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]


def test_streamed_parts_equal_the_whole_body_function_bit_for_bit(pool):
    tau_uni, masks, rescalers = emr_merge(pool.pretrained_body(), pool.finetuned_bodies())
    streamed_uni, packed, streamed_rescalers = emr_parts(pool)
    shapes = pool.body_shapes()
    assert list(streamed_uni) == pool.keys() and all(same_bits(streamed_uni[k], tau_uni[k]) for k in tau_uni)
    assert streamed_rescalers == rescalers
    for task in pool.tasks:
        for key, shape in shapes.items():
            assert packed[task][key].dtype == torch.uint8 and packed[task][key].numel() == math.ceil(math.prod(shape) / 8)
            assert torch.equal(unpack_bits(packed[task][key], shape), masks[task][key]), (task, key)


def test_each_tasks_body_equals_the_whole_body_function_bit_for_bit(pool):
    pretrained = pool.pretrained_body()
    tau_uni, masks, rescalers = emr_merge(pretrained, pool.finetuned_bodies())
    method = EMRMerging(pool)
    for task in pool.tasks:
        expected = modulated_body(pretrained, tau_uni, masks[task], rescalers[task])
        state = method.body_for(task).state_dict()
        assert list(state) == list(expected) and all(same_bits(state[k], expected[k]) for k in expected), task
    assert not torch.equal(method.body_for("cola").h[0].mlp.c_fc.weight, method.body_for("rte").h[0].mlp.c_fc.weight)


def test_one_body_at_a_time_and_the_same_bits_in_any_order(pool):
    method = EMRMerging(pool)
    first = method.body_for("rte")
    assert method.body_for("rte") is first  # kept while the same task is scored
    cola = {k: v.clone() for k, v in method.body_for("cola").state_dict().items()}
    reference = weakref.ref(first)
    del first
    gc.collect()
    assert reference() is None  # rte's body was let go when cola's was built
    method.body_for("rte")
    fresh = EMRMerging(pool)
    again = method.body_for("cola").state_dict()
    alone = fresh.body_for("cola").state_dict()
    assert all(same_bits(again[k], cola[k]) and same_bits(alone[k], cola[k]) for k in cola)


def test_bodies_are_built_in_the_merge_phase(pool):
    method = EMRMerging(pool)
    with costs.recording(costs.CostRecord()) as record:
        method.body_for("sst2")
    # The first body also computes τuni, the masks and the rescalers (reading the pool inside it):
    # the whole merge is charged to the merge phase.
    assert {"merge", "load"} <= set(record.phases)
    assert method._parts is not None


def test_task_aware_no_single_merged_body_and_unknown_task_refused(pool):
    method = EMRMerging(pool)
    assert method.kind == "task-aware" and method.display_name == "EMR-Merging" and method.exportable
    assert not hasattr(method, "merge_task")
    with pytest.raises(NotImplementedError):
        method.merge()  # no merged body: task t is scored with body_for(t)
    with pytest.raises(KeyMissing, match="'zzz'"):
        method.body_for("zzz")


def test_bodies_at_inference_counts_theta0_tau_uni_packed_masks_and_scalars(pool):
    d = sum(t.numel() for t in pool.pretrained_body().values())
    n = len(pool.tasks)
    method = EMRMerging(pool)
    assert method.bodies_at_inference() == pytest.approx(2 + n / 32 + n / d, rel=1e-12)
    # What the method holds for inference agrees: τuni one fp32 body, the masks n/32 of one.
    tau_uni, packed, _ = method.parts()
    assert sum(t.numel() * 4 for t in tau_uni.values()) == 4 * d
    mask_bytes = sum(m.numel() for masks in packed.values() for m in masks.values())
    assert n * d / 8 <= mask_bytes <= n * d / 8 + n * len(pool.keys())  # each tensor rounds up to a byte


def test_mergelit_test_scores_and_exports_each_tasks_own_body(fixtures_root, tmp_path, monkeypatch):
    """End to end: the report says task-aware, and the export holds, per task, that task's own body
    θ0 + r_t (M_t ⊙ τuni) with its head (what the scores came from), not one merged body."""
    import json
    from pathlib import Path

    from transformers import GPT2ForSequenceClassification

    from mergelit.__main__ import main

    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "configs"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(configs / "methods" / "emr.yaml"),
          "--report_save_path", str(tmp_path / "report.json"), "--merged_model_save_path", str(tmp_path / "export")])
    report = json.loads((tmp_path / "report.json").read_text())
    method = EMRMerging(ModelPool(**yaml.safe_load((fixtures_root / "config.yaml").read_text())["pool"]))
    assert report["protocol"]["kind"] == "task-aware"
    assert report["protocol"]["bodies_at_inference"] == pytest.approx(method.bodies_at_inference())
    bodies = {}
    for task in ("cola", "rte"):
        exported = GPT2ForSequenceClassification.from_pretrained(tmp_path / "export" / task).transformer.state_dict()
        expected = method.body_for(task).state_dict()
        assert all(torch.equal(exported[key], expected[key]) for key in expected), task
        bodies[task] = exported
    assert not torch.equal(bodies["cola"]["h.0.mlp.c_fc.weight"], bodies["rte"]["h.0.mlp.c_fc.weight"])
