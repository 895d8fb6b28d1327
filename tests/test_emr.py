"""EMR-Merging: the spec's worked example, its invariants, and one fresh body per task."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergelit.methods.emr import EMRMerging, elect_sign, emr_merge
from mergelit.pool import ModelPool

SHAPES = {
    "wte.weight": (11, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
}


def make_pool(n_tasks: int = 3, seed: int = 0, dyadic: bool = False):
    """θ0 and θi by hand. ``dyadic``: multiples of 1/8, so θ0 + (θi − θ0) == θi exactly."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        if dyadic:
            return torch.randint(-16, 17, shape, generator=generator).float() / 8
        return torch.randn(shape, generator=generator) * scale

    pretrained = {key: draw(shape, 1.0) for key, shape in SHAPES.items()}
    finetuned = {task: {k: pretrained[k] + draw(s, 0.1) for k, s in SHAPES.items()} for task in "abc"[:n_tasks]}
    return pretrained, finetuned


class StubPool:
    """The ModelPool methods a data-free merge reads."""

    def __init__(self, pretrained, finetuned):
        self.tasks = list(finetuned)
        self._pretrained, self._finetuned = pretrained, finetuned

    def pretrained_body(self):
        return self._pretrained

    def finetuned_bodies(self):
        return self._finetuned


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
    method = EMRMerging(StubPool(pretrained, finetuned))
    torch.testing.assert_close(method.merge_task("a")["w"], theta0 + torch.tensor([3.0, 0.0, 0.0]))
    torch.testing.assert_close(method.merge_task("b")["w"], theta0 + 6 / 7 * torch.tensor([2.0, 3.0, -2.0]))


def test_matches_the_specs_formulas_on_random_tensors():
    pretrained, finetuned = make_pool()
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    expected_uni, expected_masks, expected_rescalers = emr_reference(pretrained, finetuned)
    assert all(torch.equal(tau_uni[k], expected_uni[k]) for k in pretrained)
    assert all(torch.equal(masks[t][k], expected_masks[t][k]) for t in finetuned for k in pretrained)
    assert rescalers == expected_rescalers


def test_one_task_gives_its_own_body():
    pretrained, finetuned = make_pool(n_tasks=1, dyadic=True)
    _, _, rescalers = emr_merge(pretrained, finetuned)
    assert rescalers == {"a": 1.0}
    body = EMRMerging(StubPool(pretrained, finetuned)).merge_task("a")
    assert all(torch.equal(body[k], finetuned["a"][k]) for k in pretrained)


def test_entries_no_task_changed_stay_at_theta0():
    pretrained, finetuned = make_pool()
    key = "h.0.attn.c_attn.weight"
    untouched = torch.zeros(SHAPES[key], dtype=torch.bool)
    untouched[1, 3:7] = True
    for body in finetuned.values():
        body[key] = torch.where(untouched, pretrained[key], body[key])
    method = EMRMerging(StubPool(pretrained, finetuned))
    for task in finetuned:
        body = method.merge_task(task)[key]
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
    assert torch.equal(EMRMerging(StubPool(pretrained, finetuned)).merge_task("a")["w"], pretrained["w"])


def test_bodies_do_not_depend_on_the_order_tasks_are_built():
    pretrained, finetuned = make_pool()
    clone = lambda state: {k: v.clone() for k, v in state.items()}  # noqa: E731
    snapshot = clone(pretrained), {task: clone(body) for task, body in finetuned.items()}
    method = EMRMerging(StubPool(pretrained, finetuned))
    first = {task: method.merge_task(task) for task in ("b", "a", "c")}
    again = {task: method.merge_task(task) for task in ("a", "c", "b", "a")}
    fresh = EMRMerging(StubPool(pretrained, finetuned))
    for task in finetuned:
        alone = fresh.merge_task(task)
        for k in pretrained:
            assert torch.equal(first[task][k], again[task][k]) and torch.equal(first[task][k], alone[k]), (task, k)
    # Distinct tasks get distinct bodies, and the pool's tensors are untouched.
    assert not torch.equal(first["a"]["wte.weight"], first["b"]["wte.weight"])
    assert all(torch.equal(pretrained[k], snapshot[0][k]) for k in pretrained)
    assert all(torch.equal(finetuned[t][k], snapshot[1][t][k]) for t in finetuned for k in pretrained)


def test_no_single_merged_body_and_unknown_task_refused():
    method = EMRMerging(StubPool(*make_pool()))
    assert method.kind == "task-aware" and method.display_name == "EMR-Merging"
    with pytest.raises(NotImplementedError, match="merge_task"):
        method.merge()
    with pytest.raises(ValueError, match="'zzz'"):
        method.merge_task("zzz")


def test_inference_parameters_counts_theta0_tau_uni_masks_and_scalars():
    pretrained, finetuned = make_pool()
    d = sum(t.numel() for t in pretrained.values())
    method = EMRMerging(StubPool(pretrained, finetuned))
    assert method.inference_parameters() == pytest.approx(2 + 3 / 32 + 3 / d)
    assert method.inference_parameters(packed=False) == pytest.approx(2 + 3 / 4 + 3 / d)


def test_runs_on_the_tiny_pool(fixtures_root):
    pool = ModelPool(**yaml.safe_load((fixtures_root / "config.yaml").read_text())["pool"])
    method = EMRMerging(pool, **EMRMerging.recommended)
    pretrained = pool.pretrained_body()
    body = method.merge_task(pool.tasks[0])
    assert list(body) == list(pretrained)
    assert all(body[k].shape == pretrained[k].shape and torch.isfinite(body[k]).all() for k in body)
    assert 2 < method.inference_parameters() < 2 + len(pool.tasks) / 32 + 1e-3


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
    assert report["protocol"]["kind"] == "task-aware" and report["protocol"]["bodies_at_inference"] > 2
    method = EMRMerging(ModelPool(**yaml.safe_load((fixtures_root / "config.yaml").read_text())["pool"]))
    bodies = {}
    for task in ("cola", "rte"):
        exported = GPT2ForSequenceClassification.from_pretrained(tmp_path / "export" / task).transformer.state_dict()
        expected = method.merge_task(task)
        assert all(torch.equal(exported[key], expected[key]) for key in expected), task
        bodies[task] = exported
    assert not torch.equal(bodies["cola"]["h.0.mlp.c_fc.weight"], bodies["rte"]["h.0.mlp.c_fc.weight"])
