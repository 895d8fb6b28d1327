"""Fisher Merging: the merge formula on hand-sized tensors, the streamed per-key merge against the
whole-body oracle, and `mergelit test` end to end (fresh, then from the cache with its original cost)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.errors import MergeFailed
from mergelit.glue import GLUEDataModule
from mergelit.methods.fisher import FisherMerging, fisher_merge
from mergelit.pool import ModelPool
from mergelit.statistics import StoredStatistics, read_statistics
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES = {"h.0.attn.c_attn.weight": (2, 3), "h.0.ln_1.bias": (4,), "wte.weight": (3, 2)}


def random_state(generator: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {key: scale * torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


@pytest.fixture()
def pool_tensors():
    generator = torch.Generator().manual_seed(0)
    pretrained = random_state(generator)
    finetuned = {task: random_state(generator) for task in ("a", "b", "c")}
    # Fishers of very different sizes, so that the normalisation matters; some exact zeros.
    scales = {"a": 1e-3, "b": 1.0, "c": 50.0}
    fishers = {task: {k: v.abs() * s for k, v in random_state(generator).items()} for task, s in scales.items()}
    fishers["a"]["wte.weight"][0] = 0.0
    return pretrained, finetuned, fishers


def spec_merge(finetuned, fishers, keys, eps, normalize):
    """The spec, written out entry by entry in float64: θ* = Σ ci (Fi + ε) θi / Σ ci (Fi + ε)."""
    tasks = list(finetuned)
    n = len(tasks)
    if normalize:
        norms = [sum(float((fishers[t][k].double() ** 2).sum()) for k in keys) ** 0.5 for t in tasks]
        inverse = [1 / (norm + eps) for norm in norms]
        c = [(1 / n) * x / sum(inverse) for x in inverse]
    else:
        c = [1.0] * n
    merged = {}
    for k in keys:
        num = sum(c[i] * (fishers[t][k].double() + eps) * finetuned[t][k].double() for i, t in enumerate(tasks))
        den = sum(c[i] * (fishers[t][k].double() + eps) for i, t in enumerate(tasks))
        merged[k] = num / den
    return merged


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_merge_equals_the_spec_formula(pool_tensors, normalize, eps):
    pretrained, finetuned, fishers = pool_tensors
    merged = fisher_merge(pretrained, finetuned, fishers, minimal_fisher_weight=eps, normalize_fisher_weight=normalize)
    expected = spec_merge(finetuned, fishers, list(SHAPES), eps, normalize)
    assert merged.keys() == pretrained.keys()
    for key in SHAPES:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_normalisation_changes_the_result(pool_tensors):
    pretrained, finetuned, fishers = pool_tensors
    on = fisher_merge(pretrained, finetuned, fishers, normalize_fisher_weight=True)
    off = fisher_merge(pretrained, finetuned, fishers, normalize_fisher_weight=False)
    assert not torch.allclose(on["h.0.attn.c_attn.weight"], off["h.0.attn.c_attn.weight"], rtol=1e-3)


def test_excluded_tensors_keep_the_pretrained_value_and_leave_the_norms(pool_tensors):
    pretrained, finetuned, fishers = pool_tensors
    merged = fisher_merge(pretrained, finetuned, fishers, exclude_param_names_regex=["wte\\."])
    assert torch.equal(merged["wte.weight"], pretrained["wte.weight"])
    # ‖Fi‖ is taken over the merged tensors only: the excluded Fisher does not move the rest.
    fishers["c"]["wte.weight"] *= 1e6
    again = fisher_merge(pretrained, finetuned, fishers, exclude_param_names_regex=["wte\\."])
    expected = spec_merge(finetuned, fishers, ["h.0.attn.c_attn.weight", "h.0.ln_1.bias"], 1e-6, True)
    for key in ("h.0.attn.c_attn.weight", "h.0.ln_1.bias"):
        torch.testing.assert_close(again[key], merged[key])
        torch.testing.assert_close(again[key].double(), expected[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="Invalid regular expression"):
        fisher_merge(pretrained, finetuned, fishers, exclude_param_names_regex=["("])


def test_invariants(pool_tensors):
    pretrained, finetuned, fishers = pool_tensors
    # One model merges to itself.
    alone = fisher_merge(pretrained, {"a": finetuned["a"]}, {"a": fishers["a"]})
    assert all(torch.allclose(alone[k], finetuned["a"][k]) for k in SHAPES)
    # Equal Fishers: every model weighs the same, the plain mean.
    same = {t: fishers["b"] for t in finetuned}
    mean = fisher_merge(pretrained, finetuned, same)
    for k in SHAPES:
        torch.testing.assert_close(mean[k], sum(finetuned[t][k] for t in finetuned) / 3)
    with pytest.raises(ValueError, match="Fisher statistics for tasks"):
        fisher_merge(pretrained, finetuned, {"a": fishers["a"]})


def test_a_zero_or_non_finite_estimate_is_refused(pool_tensors):
    pretrained, finetuned, fishers = pool_tensors
    fishers["b"] = {k: torch.zeros_like(v) for k, v in fishers["b"].items()}
    with pytest.raises(MergeFailed, match="'b' model is zero everywhere"):
        fisher_merge(pretrained, finetuned, fishers)
    fishers["b"] = {k: v.clone() for k, v in fishers["c"].items()}
    fishers["b"]["h.0.ln_1.bias"][1] = float("nan")
    with pytest.raises(MergeFailed, match="'b' model has NaN/inf in 'h.0.ln_1.bias'"):
        fisher_merge(pretrained, finetuned, fishers)


def test_arguments_are_checked_and_the_merge_needs_statistics(pool_paths):
    pool = ModelPool(**pool_paths)
    with pytest.raises(RuntimeError, match=r"prepare\(trainer, datamodule\)"):
        FisherMerging(pool).merge()
    for arguments, name in (
        ({"batch_size": 0}, "batch_size"), ({"num_fisher_examples": 0}, "num_fisher_examples"),
        ({"minimal_fisher_weight": -1e-6}, "minimal_fisher_weight"), ({"normalize_fisher_weight": "yes"}, "normalize_fisher_weight"),
        ({"exclude_param_names_regex": ["("]}, "Invalid regular expression"),
    ):
        with pytest.raises(ValueError, match=name):
            FisherMerging(pool, **arguments)
    assert FisherMerging.quick == {"num_fisher_examples": 32}


# ---- the per-key merge on the fixtures pool, with real statistics --------------------------------
@pytest.fixture(scope="module")
def prepared(pool_paths, glue_path, tmp_path_factory):
    """The fixtures' pool and its Fisher statistics (16 examples per task in batches of 8), computed once."""
    import lightning as L

    pool = ModelPool(**pool_paths)
    cache = tmp_path_factory.mktemp("fisher_cache")
    method = FisherMerging(pool, num_fisher_examples=16, batch_size=8, cache_dir=str(cache))
    data = GLUEDataModule(tasks=pool.tasks, tokenizer=pool.tokenizer_path, path=str(glue_path), cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    method.prepare(trainer, data)
    return pool, method.statistics


@pytest.mark.parametrize(
    "arguments",
    [{}, {"normalize_fisher_weight": False}, {"exclude_param_names_regex": ["wte", ".*ln_"], "minimal_fisher_weight": 0.01}],
)
def test_the_streamed_merge_equals_the_whole_body_oracle_bit_for_bit(prepared, arguments):
    pool, stored = prepared
    assert isinstance(stored, StoredStatistics) and all(isinstance(stored.sources[t], Path) for t in pool.tasks)
    method = FisherMerging(pool, **arguments)
    method.statistics = stored
    merged = method.merge()
    fishers = {task: {key: stored.tensor(task, key) for key in pool.keys()} for task in pool.tasks}
    expected = fisher_merge(pool.pretrained_body(), pool.finetuned_bodies(), fishers, **arguments)
    assert list(merged) == list(expected) == pool.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
        assert merged[key].dtype == torch.float32
    if "exclude_param_names_regex" in arguments:
        assert torch.equal(merged["wte.weight"], pool.pretrained_tensor("wte.weight"))


def test_statistics_that_do_not_cover_the_body_are_refused(prepared):
    pool, stored = prepared
    method = FisherMerging(pool)
    method.statistics = StoredStatistics({task: {"wte.weight": stored.tensor(task, "wte.weight")} for task in pool.tasks})
    with pytest.raises(ValueError, match="do not cover the pool's body tensors"):
        method.merge()


def run(config: Path, tmp_path: Path, name: str) -> dict:
    report = tmp_path / f"{name}.json"
    main([
        "test", "-c", str(config), "-c", str(CONFIGS / "methods" / "fisher_merging.yaml"),
        "--model.init_args.num_fisher_examples", "16", "--model.init_args.batch_size", "8", "--data.batch_size", "64",
        "--report_save_path", str(report),
    ])
    return json.loads(report.read_text())


def test_end_to_end_then_served_from_the_cache(fixtures_root, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # Lightning's logger does not propagate to the root logger (where caplog listens) in every setup.
    lightning_logger = logging.getLogger("lightning.pytorch")
    if not lightning_logger.propagate:  # else caplog sees its records through the root logger already
        lightning_logger.addHandler(caplog.handler)
    try:
        first = run(fixtures_root / "config.yaml", tmp_path, "first")
        assert caplog.text.count("written to") == len(TASKS) and "loaded from the cache" not in caplog.text
        caplog.clear()
        second = run(fixtures_root / "config.yaml", tmp_path, "second")
        assert caplog.text.count("loaded from the cache") == len(TASKS)  # the log says so
        assert "written to" not in caplog.text
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert list(first)[: len(TASKS) + 1] == [*TASKS, "average"]  # then mnli_mismatched, protocol
    assert all(0 <= first[t]["accuracy"] <= 1 and first[t]["loss"] > 0 for t in TASKS)
    files = sorted((tmp_path / "lightning_logs/cache/statistics/fisher").iterdir())
    assert [f.name.split("-")[0] for f in files] == list(TASKS)
    # The cached run says so, and shows what the statistics cost when they were computed.
    stored = [read_statistics(f)[1] for f in files]
    computed, cached = first["protocol"]["costs"], second["protocol"]["costs"]
    assert computed["prepare_cached"] is False and cached["prepare_cached"] is True
    assert cached["prepare_original_seconds"] >= sum(float(m["seconds"]) for m in stored) > 0
    assert cached["prepare_original_peak_gb"] >= max(float(m["peak_gb"]) for m in stored)
    for report in (first, second):  # everything but the measured costs (wall times, memory)
        del report["protocol"]["costs"]
    assert second == first
