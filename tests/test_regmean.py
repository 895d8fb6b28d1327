"""RegMean: the closed form on hand-sized tensors, its special cases, the streamed per-key merge
against the whole-body oracle, and `mergelit test` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.errors import MergeFailed
from mergelit.glue import GLUEDataModule
from mergelit.methods.regmean import RegMean, reduce_non_diagonal, regmean_merge
from mergelit.pool import ModelPool
from mergelit.statistics import StoredStatistics, read_statistics
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A GPT-2-like body in miniature: two Conv1D weights stored [in, out], their biases, a layer norm.
SHAPES = {
    "h.0.attn.c_attn.weight": (3, 6),
    "h.0.attn.c_attn.bias": (6,),
    "h.0.mlp.c_fc.weight": (2, 4),
    "h.0.ln_1.weight": (3,),
}
MODULES = {"h.0.attn.c_attn": 3, "h.0.mlp.c_fc": 2}


@pytest.fixture()
def pool_tensors():
    generator = torch.Generator().manual_seed(0)
    state = lambda: {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}  # noqa: E731
    pretrained = state()
    finetuned = {task: state() for task in ("a", "b", "c")}
    grams = {}
    for task in finetuned:
        grams[task] = {}
        for module, dim in MODULES.items():
            x = torch.randn(20, dim, generator=generator, dtype=torch.float64)  # 20 positions
            grams[task][module] = x.T @ x / 20
    return pretrained, finetuned, grams


def test_reduce_non_diagonal_is_the_hadamard_product():
    gram = torch.arange(9.0).reshape(3, 3)
    r = 0.6
    mask = r * torch.ones(3, 3) + (1 - r) * torch.eye(3)
    torch.testing.assert_close(reduce_non_diagonal(gram, r), gram * mask)


@pytest.mark.parametrize("r", [0.6, 1.0, 0.0])
def test_merge_equals_the_closed_form(pool_tensors, r):
    pretrained, finetuned, grams = pool_tensors
    merged = regmean_merge(finetuned, grams, reduce_non_diagonal_ratio=r)
    for module, dim in MODULES.items():
        mask = r * torch.ones(dim, dim, dtype=torch.float64) + (1 - r) * torch.eye(dim, dtype=torch.float64)
        scaled = {t: grams[t][module] * mask for t in finetuned}
        # W* = (Σ G̃i)⁻¹ Σ G̃i Wi, W stored [in, out]: no transpose.
        weights = {t: finetuned[t][f"{module}.weight"].double() for t in finetuned}
        expected = torch.inverse(sum(scaled.values())) @ sum(scaled[t] @ weights[t] for t in finetuned)
        torch.testing.assert_close(merged[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
        assert merged[f"{module}.weight"].dtype == torch.float32
    # Every other tensor: the plain mean of the fine-tuned bodies.
    for key in ("h.0.attn.c_attn.bias", "h.0.ln_1.weight"):
        torch.testing.assert_close(merged[key], sum(finetuned[t][key] for t in finetuned) / 3)


def test_identical_grams_and_r_1_give_the_plain_mean(pool_tensors):
    pretrained, finetuned, grams = pool_tensors
    same = {t: grams["a"] for t in finetuned}
    merged = regmean_merge(finetuned, same, reduce_non_diagonal_ratio=1.0)
    for key in SHAPES:
        torch.testing.assert_close(merged[key], sum(finetuned[t][key] for t in finetuned) / 3, rtol=1e-5, atol=1e-6)


def test_the_merge_solves_the_least_squares_problem(pool_tensors):
    """With r = 1, W* minimises Σ_i ‖Xi W − Xi Wi‖²: the gradient Σ Xiᵀ Xi (W* − Wi) is zero."""
    pretrained, finetuned, grams = pool_tensors
    merged = regmean_merge(finetuned, grams, reduce_non_diagonal_ratio=1.0)
    key, module = "h.0.attn.c_attn.weight", "h.0.attn.c_attn"
    gradient = sum(grams[t][module] @ (merged[key].double() - finetuned[t][key].double()) for t in finetuned)
    assert gradient.abs().max() < 1e-5


def test_excluded_tensors_keep_the_pretrained_value(pool_tensors):
    pretrained, finetuned, grams = pool_tensors
    merged = regmean_merge(finetuned, grams, pretrained=pretrained, exclude_param_names_regex=["h\\.0\\.mlp", ".*bias"])
    assert torch.equal(merged["h.0.mlp.c_fc.weight"], pretrained["h.0.mlp.c_fc.weight"])
    assert torch.equal(merged["h.0.attn.c_attn.bias"], pretrained["h.0.attn.c_attn.bias"])
    assert torch.allclose(merged["h.0.attn.c_attn.weight"], regmean_merge(finetuned, grams)["h.0.attn.c_attn.weight"])
    with pytest.raises(ValueError, match="pass `pretrained`"):
        regmean_merge(finetuned, grams, exclude_param_names_regex=[".*bias"])


def test_a_singular_system_names_the_layer(pool_tensors):
    pretrained, finetuned, grams = pool_tensors
    for task in grams:  # input feature 0 of c_fc is zero everywhere
        grams[task]["h.0.mlp.c_fc"][0, :] = 0
        grams[task]["h.0.mlp.c_fc"][:, 0] = 0
    with pytest.raises(ValueError, match=r"'h\.0\.mlp\.c_fc'.*singular"):
        regmean_merge(finetuned, grams, reduce_non_diagonal_ratio=0.6)


def test_an_ill_conditioned_sum_is_refused(pool_tensors):
    pretrained, finetuned, grams = pool_tensors
    generator = torch.Generator().manual_seed(1)
    for task in grams:  # input features 0 and 1 of c_attn equal on every position up to 1e-7: κ ≈ 1e14
        x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
        x[:, 1] = x[:, 0] + 1e-7 * torch.randn(20, generator=generator, dtype=torch.float64)
        grams[task]["h.0.attn.c_attn"] = x.T @ x / 20
    with pytest.raises(MergeFailed, match=r"'h\.0\.attn\.c_attn'.*ill-conditioned"):
        regmean_merge(finetuned, grams, reduce_non_diagonal_ratio=1.0)


def test_arguments_are_checked_and_the_merge_needs_statistics(pool_paths):
    pool = ModelPool(**pool_paths)
    for arguments, name in (
        ({"reduce_non_diagonal_ratio": 1.5}, "reduce_non_diagonal_ratio"), ({"batch_size": 0}, "batch_size"),
        ({"num_regmean_examples": 0}, "num_regmean_examples"), ({"count_padding": "no"}, "count_padding"),
        ({"exclude_param_names_regex": ["("]}, "Invalid regular expression"),
    ):
        with pytest.raises(ValueError, match=name):
            RegMean(pool, **arguments)
    with pytest.raises(RuntimeError, match=r"prepare\(trainer, datamodule\)"):
        RegMean(pool).merge()
    assert RegMean.quick == {"num_regmean_examples": 32}


# ---- the per-key merge on the fixtures pool, with real statistics --------------------------------
@pytest.fixture(scope="module")
def prepared(pool_paths, glue_path, tmp_path_factory):
    """The fixtures' pool and its Grams (real tokens only, 32 examples per task), computed once."""
    import lightning as L

    pool = ModelPool(**pool_paths)
    cache = tmp_path_factory.mktemp("regmean_cache")
    method = RegMean(pool, num_regmean_examples=32, batch_size=16, count_padding=False, cache_dir=str(cache))
    data = GLUEDataModule(tasks=pool.tasks, tokenizer=pool.tokenizer_path, path=str(glue_path), cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    method.prepare(trainer, data)
    return pool, method.statistics


@pytest.mark.parametrize("arguments", [{}, {"reduce_non_diagonal_ratio": 0.9, "exclude_param_names_regex": ["h\\.1\\.mlp", "wpe"]}])
def test_the_streamed_merge_equals_the_whole_body_oracle_bit_for_bit(prepared, arguments):
    pool, stored = prepared
    assert isinstance(stored, StoredStatistics) and all(isinstance(stored.sources[t], Path) for t in pool.tasks)
    method = RegMean(pool, **arguments)
    method.statistics = stored
    merged = method.merge()
    grams = {task: {name: stored.tensor(task, name) for name in stored.names(task)} for task in pool.tasks}
    expected = regmean_merge(pool.finetuned_bodies(), grams, pretrained=pool.pretrained_body(), **arguments)
    assert list(merged) == list(expected) == pool.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
        assert merged[key].dtype == torch.float32
    # Solved where there are Grams (not the mean), the plain mean elsewhere.
    mean = lambda key: sum(pool.finetuned_tensor(t, key) for t in pool.tasks) / len(pool.tasks)  # noqa: E731
    assert not torch.allclose(merged["h.0.attn.c_attn.weight"], mean("h.0.attn.c_attn.weight"), atol=1e-5)
    torch.testing.assert_close(merged["h.0.attn.c_attn.bias"], mean("h.0.attn.c_attn.bias"))
    if arguments:
        assert torch.equal(merged["h.1.mlp.c_fc.weight"], pool.pretrained_tensor("h.1.mlp.c_fc.weight"))


def test_grams_of_other_modules_are_refused(prepared):
    pool, stored = prepared
    method = RegMean(pool)
    first, second = pool.tasks[:2]
    method.statistics = StoredStatistics({
        task: {name: stored.tensor(task, name) for name in stored.names(task) if task != second or name != "h.0.mlp.c_fc"}
        for task in pool.tasks
    })
    with pytest.raises(ValueError, match=f"Grams of '{second}' cover other modules than those of '{first}'"):
        method.merge()


def run(config: Path, tmp_path: Path, name: str, *extra: str) -> dict:
    report = tmp_path / f"{name}.json"
    main([
        "test", "-c", str(config), "-c", str(CONFIGS / "methods" / "regmean.yaml"),
        "--model.init_args.num_regmean_examples", "8", "--model.init_args.batch_size", "4", "--data.batch_size", "64",
        "--report_save_path", str(report), *extra,
    ])
    return json.loads(report.read_text())


def test_end_to_end(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run(fixtures_root / "config.yaml", tmp_path, "report")
    assert list(report)[: len(TASKS) + 1] == [*TASKS, "average"]  # then mnli_mismatched, protocol
    assert all(0 <= report[t]["accuracy"] <= 1 and report[t]["loss"] > 0 for t in TASKS)
    # One statistics file per task; padding counted (the config's reproduction setting).
    files = sorted((tmp_path / "lightning_logs/cache/statistics/regmean").iterdir())
    assert [f.name.split("-")[0] for f in files] == list(TASKS)
    assert json.loads(read_statistics(files[0])[1]["fields"])["count_padding"] is True
