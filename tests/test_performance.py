"""Performance options keep results: token-budget batches and the fused-GELU switch (correctness only, never timed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelit.__main__ import main
from mergelit.glue import LengthSortedBatches
from mergelit.gpt2 import build_body

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("max_tokens", [1, 7, 40, 1000])
@pytest.mark.parametrize("width", [None, 16])
def test_token_budget_batches_cover_every_row_once_within_budget(max_tokens, width):
    lengths = [3, 9, 1, 16, 4, 4, 12, 2, 7, 5, 5, 11]
    batches = list(LengthSortedBatches(lengths, batch_size=4, max_tokens=max_tokens, width=width))
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [i for batch in batches for i in batch]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # still length-sorted, longest first
    for batch in batches:
        padded = len(batch) * (width or max(lengths[i] for i in batch))
        assert padded <= max_tokens or len(batch) == 1


def test_token_budget_off_is_batch_size():
    lengths = [3, 9, 1, 16, 4]
    assert list(LengthSortedBatches(lengths, 2)) == list(LengthSortedBatches(lengths, 2, max_tokens=0))
    assert [len(b) for b in LengthSortedBatches(lengths, 2)] == [2, 2, 1]


def test_token_budget_across_ranks_scores_each_row_once():
    lengths = list(range(1, 30))
    ranks = [list(LengthSortedBatches(lengths, 4, num_replicas=2, rank=r, max_tokens=50)) for r in (0, 1)]
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(len(lengths)))


def _predictions(folder: Path) -> dict[str, list]:
    return {f.stem: [(r["idx"], r["prediction"]) for r in map(json.loads, f.read_text().splitlines())]
            for f in sorted((folder / "predictions").glob("*.jsonl"))}


def test_token_budget_gives_identical_predictions(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reports = {}
    for name, extra in {"rows": [], "tokens": ["--data.max_tokens", "300"]}.items():
        out = tmp_path / name
        out.mkdir()
        main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
              "--report_save_path", str(out / "report.json"), "--save_predictions", "true", *extra])
        reports[name] = (json.loads((out / "report.json").read_text()), _predictions(out))
    (rows, rows_pred), (tokens, tokens_pred) = reports["rows"], reports["tokens"]
    assert rows_pred and rows_pred == tokens_pred
    for task in rows_pred:
        assert rows[task]["accuracy"] == tokens[task]["accuracy"]


def test_max_tokens_validated(fixtures_root):
    from mergelit.errors import MergelitError
    from mergelit.glue import GLUEDataModule

    with pytest.raises(MergelitError, match="max_tokens"):
        GLUEDataModule(max_tokens=-1)


def _tiny_body_inputs():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=10, eos_token_id=10)
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in GPT2Model(config).state_dict().items()}
    ids = torch.randint(0, 11, (3, 6))
    return config, state, ids


def test_fused_gelu_off_is_the_default_body():
    config, state, ids = _tiny_body_inputs()
    default, off = build_body(config, state), build_body(config, state, fused_gelu=False)
    assert type(default.h[0].mlp.act) is type(off.h[0].mlp.act)
    assert type(off.h[0].mlp.act).__name__ == "NewGELUActivation"
    a = default(input_ids=ids, use_cache=False).last_hidden_state
    b = off(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(a, b)


def test_fused_gelu_on_is_close_and_uses_torch_gelu():
    config, state, ids = _tiny_body_inputs()
    fused = build_body(config, state, fused_gelu=True)
    assert all(isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "tanh" for block in fused.h)
    a = build_body(config, state)(input_ids=ids, use_cache=False).last_hidden_state
    b = fused(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(v.equal(state[k]) for k, v in fused.state_dict().items() if k in state)  # weights untouched


def test_fused_gelu_option_on_the_fixtures_keeps_every_prediction(fixtures_root, tmp_path, monkeypatch):
    """`--fused_gelu true` through `mergelit test`: the same predicted class for every example of the
    fixtures, logits within float rounding (measured max difference in the README)."""
    monkeypatch.chdir(tmp_path)
    logits = {}
    for name, extra in {"python": [], "fused": ["--fused_gelu", "true"]}.items():
        out = tmp_path / name
        out.mkdir()
        main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml"),
              "--report_save_path", str(out / "report.json"), "--save_predictions", "true", *extra])
        logits[name] = {f.stem: [json.loads(line) for line in f.read_text().splitlines()]
                        for f in sorted((out / "predictions").glob("*.jsonl"))}
    assert logits["python"].keys() == logits["fused"].keys() and logits["python"]
    difference = 0.0
    for entry, rows in logits["python"].items():
        fused = logits["fused"][entry]
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in fused], entry
        difference = max(difference, *(abs(a - b) for r, f in zip(rows, fused) for a, b in zip(r["logits"], f["logits"])))
    assert 0 < difference < 1e-4  # a different kernel (not bit-equal), the same numbers to float rounding
    print(f"fused GELU on the fixtures: max logit difference {difference:.2e}")
