"""RegMean: the closed form on hand-sized tensors, its special cases, and `mergelit test` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.tasks import TASKS
from mergelit.methods.regmean import RegMean, reduce_non_diagonal, regmean_merge
from mergelit.statistics import read_statistics

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


def test_arguments_are_checked(fixtures_root):
    import yaml

    from mergelit.pool import ModelPool

    pool = ModelPool(**yaml.safe_load((fixtures_root / "config.yaml").read_text())["pool"])
    with pytest.raises(ValueError, match="reduce_non_diagonal_ratio"):
        RegMean(pool, reduce_non_diagonal_ratio=1.5)
    with pytest.raises(RuntimeError, match=r"prepare\(trainer, datamodule\)"):
        RegMean(pool).merge()


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
