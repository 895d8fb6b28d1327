"""AdaMerging: the loss and merge on hand cases, and the adaptation (``trainer.fit``) on the tiny pool."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import yaml

from mergelit.__main__ import main
from mergelit.glue import GLUEDataModule
from mergelit.methods.adamerging import (
    AdaMerging,
    AdaMergingCoefficients,
    adamerging_merge,
    entropy_loss,
    fusionbench_entropy_loss,
)
from mergelit.methods.task_arithmetic import TaskArithmetic
from mergelit.pool import ModelPool
from mergelit.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Small and quick: each adaptation below takes a second or two on the 2-layer pool.
QUICK = {"max_steps": 3, "batch_size": 8}


# ---- the maths on hand-sized tensors -------------------------------------------------------
def test_loss_hand_case():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    # Per-example entropy of softmax([4, -4]): q = 1/(1 + e^8), H = −p ln p − q ln q ≈ 0.0030.
    q = 1 / (1 + math.exp(8))
    expected = -(1 - q) * math.log(1 - q) - q * math.log(q)
    assert entropy_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert entropy_loss(logits).item() == pytest.approx(0.0030, abs=5e-5)
    # FusionBench's: the batch-mean logits are [0, 0], the uniform distribution: ln 2 (eps 1e-8 aside).
    assert fusionbench_entropy_loss(logits).item() == pytest.approx(math.log(2), abs=1e-6)
    # One confident class for the whole batch: both losses agree it is confident.
    same = torch.tensor([[4.0, -4.0], [4.0, -4.0]])
    assert fusionbench_entropy_loss(same).item() == pytest.approx(expected, abs=1e-6)


SHAPES = {"wte.weight": (5, 3), "h.0.ln_1.bias": (3,), "h.0.attn.c_attn.weight": (3, 9)}


def hand_pool():
    g = torch.Generator().manual_seed(0)
    pretrained = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    finetuned = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in pretrained.items()} for t in ("a", "b", "c")}
    return pretrained, finetuned


def test_merge_formula_and_clamp():
    pretrained, finetuned = hand_pool()
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


# ---- the tiny pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(fixtures_config) -> ModelPool:
    return ModelPool(**fixtures_config["pool"])


def make_datamodule(fixtures_config, tmp_path_factory, path=None) -> GLUEDataModule:
    return GLUEDataModule(
        tasks=list(fixtures_config["pool"]["finetuned"]),
        tokenizer=fixtures_config["pool"]["tokenizer"],
        path=str(path or fixtures_config["data"]["path"]),
        cache_dir=str(tmp_path_factory.mktemp("tokenized")),
    )


@pytest.fixture(scope="module")
def datamodule(fixtures_config, tmp_path_factory) -> GLUEDataModule:
    return make_datamodule(fixtures_config, tmp_path_factory)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


def adapt(pool, datamodule, **kwargs) -> AdaMerging:
    method = AdaMerging(pool, **{**QUICK, **kwargs})
    method.prepare(trainer(), datamodule)
    return method


@pytest.fixture(scope="module")
def adapted(pool, datamodule) -> AdaMerging:
    """One quick layer-wise adaptation, shared by the tests that only read it."""
    return adapt(pool, datamodule)


def test_arguments_are_validated(pool):
    for kwargs, name in [
        ({"granularity": "block"}, "granularity"), ({"lr": 0.0}, "lr"), ({"max_steps": -1}, "max_steps"),
        ({"batch_size": 0}, "batch_size"), ({"loss": "ce"}, "loss"), ({"adaptation_split": "test"}, "adaptation_split"),
        ({"init_value": math.nan}, "init_value"), ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=name):
            AdaMerging(pool, **kwargs)
    with pytest.raises(RuntimeError, match=r"prepare\(trainer, datamodule\)"):
        AdaMerging(pool).merge()


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


def test_coefficient_shapes(pool, datamodule, adapted):
    num_tensors = len(pool.pretrained_body())
    assert num_tensors == 2 + 12 * 2 + 2  # wte, wpe, 12 per block, ln_f: the 2-layer fixture
    assert adapted.coefficients().shape == (len(TASKS), num_tensors)
    assert not torch.equal(adapted.coefficients(), torch.full((len(TASKS), num_tensors), 0.3))  # it moved
    assert len(adapted.losses) == QUICK["max_steps"]
    taskwise = adapt(pool, datamodule, granularity="task", max_steps=1)
    assert taskwise.coefficients().shape == (len(TASKS),)


def test_clamp_inside_the_module(pool, datamodule):
    module = AdaMerging(pool, max_steps=1)._coefficients_module(datamodule)
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
        assert set(batch[pl_module.tasks[0]]) == {"input_ids", "attention_mask"}  # no labels in the batch
        with torch.no_grad():
            first, second = pl_module.entropies(batch), pl_module.entropies(batch)
        assert all(torch.equal(first[t], second[t]) for t in first)  # dropout off: two passes agree
        self.checked += 1


def test_eval_mode_throughout(pool, datamodule):
    method = AdaMerging(pool, **QUICK)
    module = method._coefficients_module(datamodule)
    module.train()
    assert not any(m.training for m in module.modules())
    record = RecordModes()
    trainer(callbacks=[record]).fit(module)
    assert record.checked == QUICK["max_steps"] == module.steps


def test_a_few_steps_lower_the_entropy(pool, datamodule):
    # Batches of 64 hold every validation row (61) of the fixtures: each step sees the same inputs.
    method = adapt(pool, datamodule, max_steps=4, batch_size=64, lr=0.05)
    assert method.losses[-1] < method.losses[0]
    assert all(b < a for a, b in zip(method.losses, method.losses[1:]))


def test_exactly_max_steps_whatever_the_trainer_epochs(pool, datamodule):
    method = AdaMerging(pool, **QUICK)
    module = method._coefficients_module(datamodule)
    trainer(max_epochs=5).fit(module)
    assert module.steps == QUICK["max_steps"]
    with pytest.raises(ValueError, match="max_steps"):
        AdaMerging(pool, **QUICK).prepare(trainer(max_steps=2), datamodule)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        AdaMerging(pool, **QUICK).prepare(trainer(accumulate_grad_batches=2), datamodule)


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


def test_coefficients_saved_and_reloaded(pool, datamodule, adapted, tmp_path, monkeypatch):
    path = tmp_path / "adamerging.json"
    first = AdaMerging(pool, **QUICK, coefficients_path=str(path))
    first.prepare(trainer(), datamodule)
    assert torch.equal(first.coefficients(), adapted.coefficients())
    payload = json.loads(path.read_text())
    assert payload["fields"]["tasks"] == list(TASKS) and payload["fields"]["granularity"] == "layer"
    assert list(payload["coefficients"]["cola"]) == list(pool.pretrained_body())
    # A second run loads the file: no fit at all, the same merge bit for bit.
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("adapted again instead of loading"))
    second = AdaMerging(pool, **QUICK, coefficients_path=str(path))
    second.prepare(trainer(), datamodule)
    assert torch.equal(second.coefficients(), first.coefficients())
    merged, reloaded = first.merge(), second.merge()
    assert all(torch.equal(merged[k], reloaded[k]) for k in merged)
    # Another setting (here lr), or a damaged file, is not trusted: it adapts again (and says so).
    for damage in ("another lr", "truncated", "edited"):
        if damage == "truncated":
            path.write_text(path.read_text()[:200])
        elif damage == "edited":
            payload["coefficients"]["cola"]["wte.weight"] += 0.01
            path.write_text(json.dumps(payload))
        kwargs = {"lr": 0.01} if damage == "another lr" else {}
        with pytest.warns(UserWarning, match="adapting again"), pytest.raises(pytest.fail.Exception, match="adapted again"):
            AdaMerging(pool, **{**QUICK, **kwargs}, coefficients_path=str(path)).prepare(trainer(), datamodule)


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("killed")  # the run dies mid-adaptation


def test_a_killed_adaptation_leaves_no_file(pool, datamodule, tmp_path):
    path = tmp_path / "adamerging.json"
    method = AdaMerging(pool, **QUICK, coefficients_path=str(path))
    with pytest.raises(RuntimeError, match="killed"):
        method.prepare(trainer(callbacks=[Crash()]), datamodule)
    assert list(tmp_path.iterdir()) == []  # no file, not even a temporary one: the next run adapts afresh


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


def test_config_parses():
    config = yaml.safe_load((CONFIGS / "methods" / "adamerging.yaml").read_text())
    assert config["model"]["class_path"] == "mergelit.methods.AdaMerging"
    import inspect

    assert set(config["model"]["init_args"]) <= set(inspect.signature(AdaMerging.__init__).parameters)


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


def test_mergelit_fit_refuses_a_method_without_a_data_step(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "task_arithmetic.yaml")])
    assert exit_.value.code != 0
    assert "TaskArithmetic has nothing to fit" in capsys.readouterr().err


def test_a_killed_adaptation_resumes_to_the_same_coefficients(pool, datamodule, tmp_path):
    """Killed after step 3 of 4 with a checkpoint every 2 steps: the rerun resumes after step 2 and
    ends with the λ of an uninterrupted run, bit for bit; the partial file is then gone."""

    def adapted(path, kill_after=None):
        method = AdaMerging(pool, max_steps=4, batch_size=8, coefficients_path=str(path), checkpoint_every=2)
        callbacks = []
        if kill_after is not None:

            class Kill(L.Callback):
                def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                    if module.steps == kill_after:
                        raise KeyboardInterrupt  # as Ctrl-C, or the process killed

            callbacks.append(Kill())
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=callbacks)
        method.prepare(trainer, datamodule)
        return method

    uninterrupted = adapted(tmp_path / "straight.json").coefficients()
    path = tmp_path / "killed.json"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        adapted(path, kill_after=3)
    partial = Path(f"{path}.partial.safetensors")
    assert partial.is_file() and not path.exists()  # the state after step 2, no trusted result
    resumed = adapted(path)
    assert len(resumed.losses) == 2  # steps 3 and 4 only
    assert torch.equal(resumed.coefficients(), uninterrupted)
    assert path.is_file() and not partial.exists()
