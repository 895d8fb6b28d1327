"""AdaMerging: the loss and merge on hand cases, and the adaptation (``trainer.fit``) on the tiny pool."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import yaml

from mergelit.__main__ import main
from mergelit.errors import MergelitError
from mergelit.glue import GLUEDataModule
from mergelit.methods.adamerging import (
    AdaMerging,
    AdaptationBatches,
    adamerging_merge,
    entropy_loss,
    fusionbench_entropy_loss,
)
from mergelit.methods.task_arithmetic import TaskArithmetic
from mergelit.pool import ModelPool
from mergelit.tasks import GLUE_TASKS, TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Small and quick: each adaptation below takes a second or two on the 2-layer pool.
QUICK = {**AdaMerging.quick, "batch_size": 8}


# ---- the maths on hand-sized tensors -------------------------------------------------------
def test_loss_hand_case():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    # Per-example entropy of softmax([4, -4]): q = 1/(1 + e^8), H = −p ln p − q ln q = 0.0030182.
    q = 1 / (1 + math.exp(8))
    expected = -(1 - q) * math.log(1 - q) - q * math.log(q)
    assert entropy_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert entropy_loss(logits).item() == pytest.approx(0.0030182, abs=1e-7)
    # FusionBench's: the batch-mean logits are [0, 0], the uniform distribution: ln 2 (eps 1e-8 aside).
    assert fusionbench_entropy_loss(logits).item() == pytest.approx(math.log(2), abs=1e-6)
    # One confident class for the whole batch: both losses agree it is confident.
    same = torch.tensor([[4.0, -4.0], [4.0, -4.0]])
    assert fusionbench_entropy_loss(same).item() == pytest.approx(expected, abs=1e-6)


SHAPES = {"wte.weight": (5, 3), "h.0.ln_1.bias": (3,), "h.0.attn.c_attn.weight": (3, 9)}


def hand_bodies():
    g = torch.Generator().manual_seed(0)
    pretrained = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    finetuned = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in pretrained.items()} for t in ("a", "b", "c")}
    return pretrained, finetuned


def test_merge_formula_and_clamp():
    pretrained, finetuned = hand_bodies()
    lam = torch.tensor([[-0.5, 0.4, 1.7], [0.2, 0.0, 1.0], [0.3, 0.9, -2.0]])  # [n tasks, P tensors]
    originals = {t: {k: v.clone() for k, v in body.items()} for t, body in finetuned.items()}
    for clamp in (True, False):
        merged = adamerging_merge(pretrained, finetuned, lam, clamp=clamp)
        for p, key in enumerate(SHAPES):
            weights = lam[:, p].clamp(0, 1) if clamp else lam[:, p]
            expected = pretrained[key] + sum(w * (finetuned[t][key] - pretrained[key]) for w, t in zip(weights, finetuned))
            torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(finetuned[t][k], originals[t][k]) for t in finetuned for k in SHAPES)  # inputs untouched
    # A λ driven below 0 merges as 0: task a drops out of the merge entirely.
    below = torch.tensor([[-3.0] * 3, [0.5] * 3, [0.5] * 3])
    without_a = {t: finetuned[t] for t in ("b", "c")}
    merged = adamerging_merge(pretrained, finetuned, below)
    reference = adamerging_merge(pretrained, without_a, below[1:])
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in SHAPES)
    # Task-wise λ [n] is the layer-wise λ with one value per row.
    taskwise = adamerging_merge(pretrained, finetuned, torch.tensor([0.1, 0.2, 0.3]))
    layerwise = adamerging_merge(pretrained, finetuned, torch.tensor([[0.1] * 3, [0.2] * 3, [0.3] * 3]))
    assert all(torch.equal(taskwise[k], layerwise[k]) for k in SHAPES)
    with pytest.raises(ValueError, match="Coefficients for 2 tasks"):
        adamerging_merge(pretrained, finetuned, torch.zeros(2, 3))


def test_two_batches_per_step_are_the_next_two_of_the_stream():
    rows = datasets.Dataset.from_dict({"input_ids": [[i + 1] * (1 + i % 3) for i in range(10)]})
    common = dict(batch_size=3, seed=4, pad_token_id=0)
    one = list(AdaptationBatches({"a": rows, "b": rows}, num_steps=6, batches_per_step=1, **common))
    two = list(AdaptationBatches({"a": rows, "b": rows}, num_steps=3, batches_per_step=2, **common))
    for step, batch in enumerate(two):
        for task in ("a", "b"):
            assert len(batch[task]) == 2
            for j in range(2):
                assert torch.equal(batch[task][j]["input_ids"], one[2 * step + j][task][0]["input_ids"])
    # Each pass over the 10 rows is a permutation cut into batches of 3, 3, 3, 1.
    assert [len(one[s]["a"][0]["input_ids"]) for s in range(6)] == [3, 3, 3, 1, 3, 3]
    assert sorted(int(x) for s in range(4) for x in one[s]["a"][0]["input_ids"][:, 0]) == list(range(1, 11))


# ---- the tiny pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(fixtures_config) -> ModelPool:
    return ModelPool(**fixtures_config["pool"])


def make_datamodule(fixtures_config, tmp_path_factory, path=None, **kwargs) -> GLUEDataModule:
    return GLUEDataModule(
        tasks=list(fixtures_config["pool"]["finetuned"]),
        tokenizer=fixtures_config["pool"]["tokenizer"],
        path=str(path or fixtures_config["data"]["path"]),
        cache_dir=str(tmp_path_factory.mktemp("tokenized")),
        **kwargs,
    )


@pytest.fixture(scope="module")
def datamodule(fixtures_config, tmp_path_factory) -> GLUEDataModule:
    return make_datamodule(fixtures_config, tmp_path_factory)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


def adapt(pool, datamodule, trainer_=None, **kwargs) -> AdaMerging:
    method = AdaMerging(pool, **{**QUICK, **kwargs})
    method.prepare(trainer_ or trainer(), datamodule)
    return method


def no_fit(monkeypatch):
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("adapted instead of refusing or loading"))


def copy_data(fixtures_config, folder: Path, changed_rows: dict | None = None) -> Path:
    """The fixtures' GLUE data at ``folder``; ``changed_rows``: {(task, split): rows} whose texts are changed."""
    for task in TASKS:
        splits = datasets.load_from_disk(str(Path(fixtures_config["data"]["path"]) / task))
        out = {}
        for name, split in splits.items():
            rows = set((changed_rows or {}).get((task, name), ()))
            field = GLUE_TASKS[task].text_fields[0]
            out[name] = split.map(lambda row, i: {field: (row[field] + " utterly different words") if i in rows else row[field]},
                                  with_indices=True) if rows else split
        shutil.rmtree(folder / task, ignore_errors=True)
        datasets.DatasetDict(out).save_to_disk(str(folder / task))
    return folder


@pytest.fixture(scope="module")
def adapted(pool, datamodule) -> AdaMerging:
    """One quick layer-wise adaptation, shared by the tests that only read it."""
    return adapt(pool, datamodule)


def test_arguments_are_validated(pool):
    for kwargs, name in [
        ({"granularity": "block"}, "granularity"), ({"lr": 0.0}, "lr"), ({"max_steps": -1}, "max_steps"),
        ({"batch_size": 0}, "batch_size"), ({"batches_per_step": 0}, "batches_per_step"), ({"loss": "ce"}, "loss"),
        ({"adaptation_split": "test"}, "adaptation_split"), ({"init_value": math.nan}, "init_value"),
        ({"seed": -1}, "seed"), ({"checkpoint_every": 1.5}, "checkpoint_every"), ({"max_steps": True}, "max_steps"),
    ]:
        with pytest.raises(MergelitError, match=name):
            AdaMerging(pool, **kwargs)
    with pytest.raises(RuntimeError, match=r"prepare\(trainer, datamodule\)"):
        AdaMerging(pool).merge()


def test_defaults_are_the_papers(pool):
    method = AdaMerging(pool)
    assert (method.batch_size, method.batches_per_step, method.lr, method.clamp, method.max_steps) == (16, 2, 1e-3, True, 500)
    assert AdaMerging.quick == {"max_steps": 3}


def test_what_the_report_says_was_read(pool):
    method = AdaMerging(pool)
    assert (method.data, method.transductive) == ("validation inputs", True)  # the default: the paper's setting
    method = AdaMerging(pool, adaptation_split="train")
    assert (method.data, method.transductive) == ("train inputs", False)


def test_max_steps_0_is_task_arithmetic_without_fit(pool):
    method = AdaMerging(pool, max_steps=0)
    method.prepare(None, None)  # no Trainer needed: nothing is fitted
    merged = method.merge()
    reference = TaskArithmetic(pool, scaling_factor=0.3).merge()
    assert merged.keys() == reference.keys()
    for key in reference:  # Σi 0.3 τi versus 0.3 Σi τi: float rounding only
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-6, atol=1e-6, msg=key)


def test_per_key_merge_is_the_whole_body_oracle_bit_for_bit(pool):
    method = AdaMerging(pool, max_steps=0)
    lam = torch.rand(len(pool.tasks), len(pool.keys()), generator=torch.Generator().manual_seed(3)) * 1.4 - 0.2
    method._coefficients = lam  # as a finished adaptation leaves it
    merged = method.merge()
    oracle = adamerging_merge(pool.pretrained_body(), pool.finetuned_bodies(), lam)
    assert list(merged) == list(oracle) == pool.keys()
    assert all(torch.equal(merged[k].view(torch.int32), oracle[k].view(torch.int32)) for k in oracle)


def test_coefficient_shapes(pool, datamodule, adapted):
    num_tensors = len(pool.keys())
    assert num_tensors == 2 + 12 * 2 + 2  # wte, wpe, 12 per block, ln_f: the 2-layer fixture
    assert adapted.coefficients().shape == (len(TASKS), num_tensors)
    assert not torch.equal(adapted.coefficients(), torch.full((len(TASKS), num_tensors), 0.3))  # it moved
    assert len(adapted.losses) == QUICK["max_steps"]
    taskwise = adapt(pool, datamodule, granularity="task", max_steps=1)
    assert taskwise.coefficients().shape == (len(TASKS),)


def test_clamp_inside_the_module(pool, datamodule):
    module = AdaMerging(pool, max_steps=1).adaptation_module(datamodule)
    with torch.no_grad():
        module.coefficients[0, :] = -1.0  # task 0 driven below 0
    merged = module.merged_parameters()
    others = {t: pool.finetuned_body(t) for t in pool.tasks[1:]}
    reference = adamerging_merge(pool.pretrained_body(), others, torch.full((len(others), len(merged)), 0.3))
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)
    # No gradient reaches a clamped-out entry.
    batch = next(iter(module.batches))
    sum(module.entropies(batch).values()).backward()
    assert torch.all(module.coefficients.grad[0] == 0) and torch.any(module.coefficients.grad[1:] != 0)


class RecordModes(L.Callback):
    """Checks, at every step of the fit, that nothing is in train mode and that the forward is deterministic."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert not any(m.training for m in pl_module.modules())
        parts = batch[pl_module.tasks[0]]
        assert len(parts) == 2 and all(set(part) == {"input_ids", "attention_mask"} for part in parts)  # no labels
        with torch.no_grad():
            first, second = pl_module.entropies(batch), pl_module.entropies(batch)
        assert all(torch.equal(first[t], second[t]) for t in first)  # dropout off: two passes agree
        self.checked += 1


def test_eval_mode_throughout(pool, datamodule):
    module = AdaMerging(pool, **QUICK).adaptation_module(datamodule)
    module.train()
    assert not any(m.training for m in module.modules())
    record = RecordModes()
    trainer(callbacks=[record]).fit(module)
    assert record.checked == QUICK["max_steps"] == module.steps


def test_a_few_steps_lower_the_entropy(pool, datamodule):
    # Batches of 64 hold every validation row (61) of the fixtures: each step sees the same inputs.
    method = adapt(pool, datamodule, max_steps=4, batch_size=64, batches_per_step=1, lr=0.05)
    assert method.losses[-1] < method.losses[0]
    assert all(b < a for a, b in zip(method.losses, method.losses[1:]))


def test_exactly_max_steps_whatever_the_trainer_epochs(pool, datamodule):
    module = AdaMerging(pool, **QUICK).adaptation_module(datamodule)
    trainer(max_epochs=5).fit(module)
    assert module.steps == QUICK["max_steps"]


@pytest.mark.parametrize(
    "setting, kwargs",
    [
        ("max_time", {"max_time": {"minutes": 5}}),
        ("max_steps", {"max_steps": 2}),
        ("limit_train_batches", {"limit_train_batches": 2}),
        ("limit_train_batches", {"limit_train_batches": 0.5}),
        ("max_epochs", {"max_epochs": 0}),
        ("accumulate_grad_batches", {"accumulate_grad_batches": 2}),
    ],
)
def test_trainer_settings_that_would_stop_it_are_refused_before_fitting(pool, datamodule, monkeypatch, setting, kwargs):
    no_fit(monkeypatch)
    with pytest.raises(MergelitError, match=rf"trainer\.{setting}") as error:
        AdaMerging(pool, **QUICK).prepare(trainer(**kwargs), datamodule)
    assert "leave" in str(error.value).lower()  # ... and says what to do


def test_one_batch_per_step_is_another_adaptation(pool, datamodule, adapted):
    # `adapted` takes the default two batches per task per step (RecordModes checks the batches' shape).
    one = adapt(pool, datamodule, batches_per_step=1)
    assert len(one.losses) == len(adapted.losses) == QUICK["max_steps"]
    assert not torch.equal(one.coefficients(), adapted.coefficients())


def test_deterministic_from_a_seed(pool, datamodule, adapted):
    again = adapt(pool, datamodule)
    assert torch.equal(again.coefficients(), adapted.coefficients())  # bit-identical
    other = adapt(pool, datamodule, seed=1)
    assert not torch.equal(other.coefficients(), adapted.coefficients())  # the seed orders the inputs


def test_labels_are_never_read(pool, fixtures_config, tmp_path_factory, adapted):
    # The same inputs with every task's labels permuted: the learned λ is bit-identical.
    folder = tmp_path_factory.mktemp("permuted_labels")
    for task in TASKS:
        splits = datasets.load_from_disk(str(Path(fixtures_config["data"]["path"]) / task))
        permuted = {}
        for name, split in splits.items():
            labels = split["label"]
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7)).tolist()
            permuted[name] = split.remove_columns("label").add_column("label", [labels[i] for i in order])
        datasets.DatasetDict(permuted).save_to_disk(str(folder / task))
    permuted_datamodule = make_datamodule(fixtures_config, tmp_path_factory, path=folder)
    assert permuted_datamodule.eval_dataset("cola")["label"] != make_datamodule(
        fixtures_config, tmp_path_factory).eval_dataset("cola")["label"]
    method = adapt(pool, permuted_datamodule)
    assert torch.equal(method.coefficients(), adapted.coefficients())


def test_dev_rows_never_adapt(pool, fixtures_config, tmp_path_factory):
    """With held-out dev rows, the adaptation rows are the train rows without them: changing the dev
    rows' texts changes nothing, while the same change without the hold-out does change λ."""
    dm = make_datamodule(fixtures_config, tmp_path_factory, hold_out_dev=True, dev_source="train")
    method = AdaMerging(pool, **QUICK, adaptation_split="train")
    inputs = method.adaptation_inputs(dm)
    for task in TASKS:
        dev = set(dm.held_out_rows(task, GLUE_TASKS[task].train_split))
        assert 0 < len(dev) < len(dm.train_dataset(task))
        kept = [i for i in range(len(dm.train_dataset(task))) if i not in dev]
        assert inputs[task]["input_ids"] == dm.train_dataset(task).select(kept)["input_ids"]
    changed = {(t, GLUE_TASKS[t].train_split): dm.held_out_rows(t, GLUE_TASKS[t].train_split) for t in TASKS}
    folder = copy_data(fixtures_config, tmp_path_factory.mktemp("dev_changed"), changed)
    dm_changed = make_datamodule(fixtures_config, tmp_path_factory, path=folder, hold_out_dev=True, dev_source="train")
    assert dm_changed.train_dataset("cola")["input_ids"] != dm.train_dataset("cola")["input_ids"]  # the change is real
    held_out = adapt(pool, dm, adaptation_split="train").coefficients()
    assert torch.equal(adapt(pool, dm_changed, adaptation_split="train").coefficients(), held_out)
    # Without the hold-out the same dev rows are read, and the change shows in λ.
    plain = adapt(pool, make_datamodule(fixtures_config, tmp_path_factory), adaptation_split="train").coefficients()
    plain_changed = adapt(pool, make_datamodule(fixtures_config, tmp_path_factory, path=folder), adaptation_split="train")
    assert not torch.equal(plain_changed.coefficients(), plain)


def test_validation_dev_rows_never_adapt(pool, fixtures_config, tmp_path_factory):
    """Transductive adaptation on the validation inputs leaves out the validation rows held out for
    selection (data.dev_source: validation), as scoring does."""
    dm = make_datamodule(fixtures_config, tmp_path_factory, hold_out_dev=True, dev_source="validation")
    inputs = AdaMerging(pool, **QUICK).adaptation_inputs(dm)
    for task in TASKS:
        split = GLUE_TASKS[task].eval_split
        dev = set(dm.held_out_rows(task, split))
        assert 0 < len(dev) < len(dm.eval_dataset(task))
        kept = [i for i in range(len(dm.eval_dataset(task))) if i not in dev]
        assert inputs[task]["input_ids"] == dm.eval_dataset(task).select(kept)["input_ids"]


def test_coefficients_saved_and_reloaded(pool, datamodule, adapted, tmp_path, monkeypatch):
    path = tmp_path / "adamerging.json"
    first = AdaMerging(pool, **QUICK, coefficients_path=str(path))
    first.prepare(trainer(), datamodule)
    assert torch.equal(first.coefficients(), adapted.coefficients())
    record = json.loads(path.read_text())
    assert set(record) == {"key", "checksum", "payload"}  # mergelit.cache's record
    assert list(record["payload"]["coefficients"]["cola"]) == pool.keys()
    assert not Path(f"{path}.checkpoints").exists()  # finished: no checkpoint left
    # A second run loads the file: no fit at all, the same merge bit for bit.
    no_fit(monkeypatch)
    second = AdaMerging(pool, **QUICK, coefficients_path=str(path))
    second.prepare(trainer(), datamodule)
    assert torch.equal(second.coefficients(), first.coefficients()) and second.losses == []
    merged, reloaded = first.merge(), second.merge()
    assert all(torch.equal(merged[k], reloaded[k]) for k in merged)
    # Another setting (here lr), or a damaged file, is not trusted: it adapts again (and says so).
    for damage in ("another lr", "another batches_per_step", "truncated", "edited"):
        if damage == "truncated":
            path.write_text(path.read_text()[:200])
        elif damage == "edited":
            record["payload"]["coefficients"]["cola"]["wte.weight"] += 0.01
            path.write_text(json.dumps(record))
        kwargs = {"another lr": {"lr": 0.01}, "another batches_per_step": {"batches_per_step": 1}}.get(damage, {})
        with pytest.warns(UserWarning, match="not trusted"), pytest.raises(pytest.fail.Exception, match="adapted"):
            AdaMerging(pool, **{**QUICK, **kwargs}, coefficients_path=str(path)).prepare(trainer(), datamodule)


def test_coefficients_not_trusted_once_the_rows_change_at_the_same_path(pool, fixtures_config, tmp_path, tmp_path_factory):
    data = copy_data(fixtures_config, tmp_path / "glue")
    path = tmp_path / "adamerging.json"
    first = adapt(pool, make_datamodule(fixtures_config, tmp_path_factory, path=data), coefficients_path=str(path))
    written = json.loads(path.read_text())["key"]
    # The same data.path, three validation texts of one task changed.
    copy_data(fixtures_config, data, {("rte", GLUE_TASKS["rte"].eval_split): [0, 5, 9]})
    with pytest.warns(UserWarning, match=r"coefficients cache file .* is not trusted"):
        second = adapt(pool, make_datamodule(fixtures_config, tmp_path_factory, path=data), coefficients_path=str(path))
    assert len(second.losses) == QUICK["max_steps"]  # adapted again, on the new rows
    assert json.loads(path.read_text())["key"] != written
    assert not torch.equal(second.coefficients(), first.coefficients())


def test_a_folder_or_a_file_in_the_way_is_refused_before_adapting(pool, datamodule, tmp_path, monkeypatch):
    no_fit(monkeypatch)
    with pytest.raises(MergelitError, match=r"coefficients_path .* is a folder; give a file path"):
        AdaMerging(pool, **QUICK, coefficients_path=str(tmp_path)).prepare(trainer(), datamodule)
    (tmp_path / "file").write_text("")
    with pytest.raises(MergelitError, match=r"cannot be written: .*file.* is a file, not a folder"):
        AdaMerging(pool, **QUICK, coefficients_path=str(tmp_path / "file" / "lambda.json")).prepare(trainer(), datamodule)


class Kill(L.Callback):
    def __init__(self, after: int):
        self.after = after

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.after:
            raise KeyboardInterrupt  # as Ctrl-C, or the process killed


def test_a_killed_adaptation_resumes_through_lightning_checkpoints_to_the_same_coefficients(pool, datamodule, tmp_path):
    """Killed after step 3 of 4 with a checkpoint every 2 steps: no coefficients file is trusted, the
    rerun resumes after step 2 through ``trainer.fit(ckpt_path=...)`` and ends with the λ of an
    uninterrupted run, bit for bit; the checkpoints are then gone."""

    def run(path, kill_after=None):
        method = AdaMerging(pool, max_steps=4, batch_size=8, coefficients_path=str(path), checkpoint_every=2)
        method.prepare(trainer(callbacks=[Kill(kill_after)] if kill_after else []), datamodule)
        return method

    uninterrupted = run(tmp_path / "straight.json").coefficients()
    path = tmp_path / "killed.json"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(path, kill_after=3)
    assert not path.exists()  # no result until the adaptation has finished
    (folder,) = Path(f"{path}.checkpoints").iterdir()  # one folder: this run's content key
    assert [p.name for p in folder.iterdir()] == ["step=2.ckpt"]
    checkpoint = torch.load(folder / "step=2.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["coefficients"]  # λ alone, not the frozen pool
    resumed = run(path)
    assert len(resumed.losses) == 2  # steps 3 and 4 only
    assert torch.equal(resumed.coefficients(), uninterrupted)
    assert path.is_file() and not Path(f"{path}.checkpoints").exists()


def test_a_checkpoint_of_another_run_or_damaged_is_not_resumed(pool, datamodule, tmp_path):
    path = tmp_path / "lambda.json"

    def method():
        return AdaMerging(pool, max_steps=4, batch_size=8, coefficients_path=str(path), checkpoint_every=2)

    with pytest.raises((KeyboardInterrupt, SystemExit)):
        method().prepare(trainer(callbacks=[Kill(3)]), datamodule)
    (folder,) = Path(f"{path}.checkpoints").iterdir()
    key = folder.name
    assert method()._latest_checkpoint(folder, key) == (str(folder / "step=2.ckpt"), 2)
    with pytest.warns(UserWarning, match=r"AdaMerging checkpoint cache file .* is not trusted \(it was written for key"):
        assert method()._latest_checkpoint(folder, "another key") is None
    checkpoint = folder / "step=2.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # killed while writing it
    with pytest.warns(UserWarning, match=r"is not trusted \(unreadable"):
        rerun = method()
        rerun.prepare(trainer(), datamodule)
    assert len(rerun.losses) == 4  # from step 0


def test_fast_dev_run_adapts_one_step_and_saves_nothing(pool, datamodule, tmp_path):
    method = AdaMerging(pool, **QUICK, coefficients_path=str(tmp_path / "adamerging.json"))
    with pytest.warns(UserWarning, match="fast_dev_run"):
        method.prepare(trainer(fast_dev_run=True), datamodule)
    assert len(method.losses) == 1 and list(tmp_path.iterdir()) == []


def run_cli(fixtures_root: Path, tmp_path: Path, method: str, *args: str) -> dict:
    report = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / f"{method}.yaml"),
          "--data.batch_size", "64", "--report_save_path", str(report), *args])
    return json.loads(report.read_text())


def test_end_to_end(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run_cli(fixtures_root, tmp_path, "adamerging", "--model.init_args.max_steps", "3",
                     "--model.init_args.batch_size", "8")
    assert list(report)[: len(TASKS) + 1] == [*TASKS, "average"]  # then mnli_mismatched, protocol
    assert all(0 <= report[t]["accuracy"] <= 1 and report[t]["loss"] > 0 for t in TASKS)
    logged = (tmp_path / "lightning_logs").rglob("metrics.csv")
    assert any("adamerging/loss" in f.read_text().splitlines()[0] for f in logged)
    # max_steps 0: the same accuracies as Task Arithmetic with λ = 0.3.
    skipped = run_cli(fixtures_root, tmp_path, "adamerging", "--model.init_args.max_steps", "0")
    task_arithmetic = run_cli(fixtures_root, tmp_path, "task_arithmetic")
    assert {t: skipped[t]["accuracy"] for t in TASKS} == {t: task_arithmetic[t]["accuracy"] for t in TASKS}
    for t in TASKS:
        assert skipped[t]["loss"] == pytest.approx(task_arithmetic[t]["loss"], rel=1e-5)


def test_max_time_on_the_command_line_is_one_line_before_adapting(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_fit(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        run_cli(fixtures_root, tmp_path, "adamerging", "--model.init_args.max_steps", "3", "--trainer.max_time", "00:00:10:00")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "mergelit: error: trainer.max_time" in err and "Traceback" not in err


def test_config_parses():
    config = yaml.safe_load((CONFIGS / "methods" / "adamerging.yaml").read_text())
    assert config["model"]["class_path"] == "mergelit.methods.AdaMerging"
    import inspect

    assert set(config["model"]["init_args"]) <= set(inspect.signature(AdaMerging.__init__).parameters)
    assert (config["model"]["init_args"]["batch_size"], config["model"]["init_args"]["batches_per_step"]) == (16, 2)


def test_mergelit_fit_adapts_alone_and_test_reuses_the_coefficients(fixtures_root, tmp_path, monkeypatch):
    """`mergelit fit` with a merge config runs only the adaptation and saves λ; `mergelit test` with that
    file loads it (no second fit) and scores the merge the coefficients give."""
    monkeypatch.chdir(tmp_path)
    coefficients = tmp_path / "lambda.json"
    common = ["-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "adamerging.yaml"),
              "--model.init_args.max_steps", "2", "--model.init_args.batch_size", "8",
              "--model.init_args.coefficients_path", str(coefficients), "--trainer.enable_progress_bar", "false"]
    main(["fit", *common])
    assert coefficients.is_file() and not list(tmp_path.rglob("report.json"))  # adapted, nothing scored
    saved = coefficients.read_text()
    before = coefficients.stat().st_mtime_ns
    main(["test", *common, "--report_save_path", str(tmp_path / "report.json")])
    assert coefficients.read_text() == saved and coefficients.stat().st_mtime_ns == before  # loaded, not re-adapted
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(0 <= report[t]["accuracy"] <= 1 for t in TASKS)
    assert report["protocol"]["costs"]["prepare_cached"] is True  # the adaptation's own time, not this run's read


def test_mergelit_fit_refuses_a_method_without_a_data_step(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml")])
    assert exit_.value.code != 0
    assert "TaskArithmetic has nothing to fit" in capsys.readouterr().err
