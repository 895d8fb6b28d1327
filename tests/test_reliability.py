"""Issue 14: every bad input is a short clear error (no traceback, exit 2), raised before heavy work
where it can be known then, or the stated safe behaviour. docs/reliability.md lists each case.

Each case feeds the bad input through ``mergelit.__main__.main`` in-process; ``heavy_work_forbidden``
makes ``Trainer.test``/``Trainer.predict``/``Trainer.fit`` fail loudly, so a check that fires only
after the heavy work started fails the test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelit.__main__ import main
from mergelit.errors import MergeFailed, MergelitError
from mergelit.tasks import GLUE_TASKS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD = CONFIGS / "methods" / "task_arithmetic.yaml"


def mergelit(capsys, *args: str) -> tuple[int, str]:
    """Run ``mergelit ARGS`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def assert_short_error(code: int, err: str, *needles: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    line = next((l for l in err.splitlines() if l.startswith(("mergelit: error:", "error:"))), None)
    assert line is not None, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return line


@pytest.fixture
def heavy_work_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the check fired")

    for name in ("test", "predict", "fit"):
        monkeypatch.setattr(L.Trainer, name, forbidden)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_args(fixtures_root: Path, *extra: str, method: Path = METHOD) -> list[str]:
    return ["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(method), *extra]


def copy_model(fixtures_root: Path, task: str, dest: Path) -> Path:
    shutil.copytree(fixtures_root / "pool" / task, dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def copy_data(fixtures_root: Path, dest: Path, task: str | None = None, edit=None) -> Path:
    """The fixture GLUE folder copied to ``dest``; ``edit(DatasetDict) -> DatasetDict`` rewrites ``task``."""
    shutil.copytree(fixtures_root / "glue", dest, ignore=shutil.ignore_patterns(task) if task else None)
    if task is not None:
        import datasets

        loaded = datasets.load_from_disk(str(fixtures_root / "glue" / task))
        edit(loaded).save_to_disk(str(dest / task))
    return dest


# ---- the entry point -------------------------------------------------------------------------
def test_user_mistake_is_one_line_and_debug_shows_the_traceback(fixtures_root, workdir, capsys, monkeypatch, heavy_work_forbidden):
    args = cli_args(fixtures_root, "--model.init_args.threshold", "200", method=CONFIGS / "methods" / "ties_merging.yaml")
    code, err = mergelit(capsys, *args)
    line = assert_short_error(code, err, "threshold", "200")
    assert code == 2 and line.startswith("mergelit: error:")
    assert err.count("must be in (0, 100]") == 1  # jsonargparse's re-wrap (every Union subtype) is unwrapped
    with pytest.raises(ValueError, match="threshold"):
        main([*args, "--debug"])
    monkeypatch.setenv("MERGELIT_DEBUG", "1")
    with pytest.raises(ValueError, match="threshold"):
        main(args)


def test_an_internal_error_keeps_its_traceback(fixtures_root, workdir, monkeypatch):
    def bug(*args, **kwargs):
        raise IndexError("a genuine bug")

    monkeypatch.setattr("mergelit.run.check_inputs", bug)
    with pytest.raises(IndexError):
        main(cli_args(fixtures_root))


def test_no_traceback_in_a_real_process(fixtures_root, tmp_path):
    """One subprocess (they cost seconds): stderr of the real command holds no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MERGELIT_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "mergelit", *cli_args(fixtures_root, "--pool.finetuned.sst2", str(tmp_path / "nowhere"))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "mergelit: error:" in done.stderr and "nowhere" in done.stderr and "'sst2'" in done.stderr


# ---- 1. tasks ----------------------------------------------------------------------------------
def test_unknown_task(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.sst3", str(fixtures_root / "pool" / "sst2")))
    assert_short_error(code, err, "'sst3'", "sst2")


def test_data_tasks_differ_from_the_pool(fixtures_root, workdir):
    from mergelit.glue import GLUEDataModule
    from mergelit.methods.task_arithmetic import TaskArithmetic
    from mergelit.pool import ModelPool
    from mergelit.run import check_inputs

    pool = ModelPool(str(fixtures_root / "pool" / "pretrained"), {t: str(fixtures_root / "pool" / t) for t in ("cola", "sst2")})
    data = GLUEDataModule(["cola"], pool.tokenizer_path, str(fixtures_root / "glue"))
    with pytest.raises(MergelitError, match=r"data's tasks \['cola'\] differ from the pool's \['cola', 'sst2'\]"):
        check_inputs(L.Trainer(logger=False), TaskArithmetic(pool), data)


# ---- 2. paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["absolute", "relative", "dotted"])
def test_missing_pool_folder(kind, fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "checkpoints").mkdir()
    path = {"absolute": str(workdir / "gone" / "gpt2_sst2"), "relative": "checkpoints/gpt2_sst2", "dotted": "./gpt2_sst2"}[kind]
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.sst2", path))
    assert_short_error(code, err, path, "'sst2'", "does not exist")
    assert "huggingface.co" not in err


def test_hub_id_while_offline(fixtures_root, workdir, capsys, monkeypatch, heavy_work_forbidden):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.sst2", "someone/gpt2_sst2_nowhere"))
    assert_short_error(code, err, "someone/gpt2_sst2_nowhere", "offline", "local folder", "'sst2'")


def test_every_model_is_checked_before_statistics(fixtures_root, workdir, capsys, heavy_work_forbidden):
    """The last task's checkpoint is broken: RegMean fails before any statistics."""
    bad = copy_model(fixtures_root, "sst2", workdir / "bad_sst2")
    edit_weights(bad, lambda t: t.__setitem__("score.weight", t["score.weight"] * math.nan))
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.sst2", str(bad), method=CONFIGS / "methods" / "regmean.yaml"))
    assert_short_error(code, err, "'sst2'", "score.weight", "NaN")
    assert not list(workdir.rglob("*.safetensors"))[:0] and not (workdir / "lightning_logs" / "cache" / "statistics").exists()


# ---- 3. architecture ---------------------------------------------------------------------------
def test_body_of_another_width(fixtures_root, workdir, capsys, heavy_work_forbidden):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = json.loads((fixtures_root / "pool" / "cola" / "config.json").read_text())
    config.update(n_embd=32, n_layer=1)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}))
    model.save_pretrained(workdir / "narrow")
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.cola", str(workdir / "narrow")))
    # The config is compared first: its first differing field is named (shapes follow from it).
    assert_short_error(code, err, "'cola'", "narrow", "another architecture", "n_layer 1", "2")


# ---- 4. labels count ---------------------------------------------------------------------------
def test_head_with_the_wrong_number_of_labels(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.mnli", str(fixtures_root / "pool" / "qnli")))
    assert_short_error(code, err, "'mnli'", "2 labels", "3")


# ---- 5. pickle -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_is_refused_unread(name, fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "cola", workdir / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"\x80\x04 not a pickle anyone should load")  # never unpickled
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.cola", str(folder)))
    assert_short_error(code, err, "pickled", name, "safetensors", "save_pretrained")


def test_nothing_in_mergelit_unpickles():
    for path in (ROOT / "mergelit").rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "pickle.load" not in line, f"{path}: {line.strip()}"


# ---- 6. corrupt safetensors ----------------------------------------------------------------------
def test_truncated_safetensors(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "cola", workdir / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.cola", str(folder)))
    assert_short_error(code, err, "truncated/model.safetensors", "not a readable safetensors")


def test_safetensors_that_are_not_a_gpt2_body(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "cola", workdir / "random")
    save_file({"encoder.weight": torch.randn(4, 4)}, folder / "model.safetensors")
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.cola", str(folder)))
    assert_short_error(code, err, "random/model.safetensors", "no GPT-2 body")


def test_safetensors_missing_tensors_are_not_random_initialised(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "cola", workdir / "partial")
    edit_weights(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.cola", str(folder)))
    assert_short_error(code, err, "partial", "h.1.mlp.c_fc.weight")


# ---- 7. non-finite -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_is_refused(value, fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "rte", workdir / "nan_rte")

    def poison(tensors):
        tensors["transformer.wte.weight"][7, 3] = value  # one embedding row: invisible in the report

    edit_weights(folder, poison)
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.rte", str(folder)))
    assert_short_error(code, err, "'rte'", "wte.weight", "NaN/inf")
    assert not list(workdir.rglob("report.json"))


def test_non_finite_pretrained_is_refused(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "pretrained", workdir / "nan_pre")
    edit_weights(folder, lambda t: t.__setitem__(next(k for k in t if k.endswith("ln_f.weight")), t[next(k for k in t if k.endswith("ln_f.weight"))] / 0 * 0))
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.pretrained", str(folder)))
    assert_short_error(code, err, "pretrained", "ln_f.weight")


def test_merge_that_produces_nan_is_not_scored(fixtures_root, workdir, monkeypatch, capsys):
    from mergelit.methods import task_arithmetic

    real = task_arithmetic.TaskArithmetic.merge

    def degenerate(self):
        merged = dict(real(self))
        merged["h.0.ln_1.weight"] = merged["h.0.ln_1.weight"] / 0.0  # a degenerate normalisation
        return merged

    monkeypatch.setattr(task_arithmetic.TaskArithmetic, "merge", degenerate)
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--report_save_path", str(workdir / "r.json")))
    assert_short_error(code, err, "h.0.ln_1.weight", "not scored")
    assert not (workdir / "r.json").exists() and not list(workdir.rglob("report.json"))


# ---- 8. dtypes ---------------------------------------------------------------------------------
def test_half_precision_checkpoint_is_cast_with_one_warning(fixtures_root, workdir):
    from mergelit.pool import ModelPool

    folder = copy_model(fixtures_root, "sst2", workdir / "half")
    edit_weights(folder, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    pool = ModelPool(str(fixtures_root / "pool" / "pretrained"), {"sst2": str(folder)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.check()
        pool.check()
    messages = [str(w.message) for w in caught if "float32" in str(w.message)]
    assert len(messages) == 1 and "BF16" in messages[0] and "half" in messages[0]
    assert all(t.dtype == torch.float32 for t in pool.finetuned_body("sst2").values())


# ---- 9. tokenizer and heads ----------------------------------------------------------------------
def test_tokenizer_without_pad_gets_endoftext(fixtures_root):
    from mergelit.glue import load_tokenizer

    tokenizer = load_tokenizer(str(fixtures_root / "pool" / "pretrained"))
    assert tokenizer.pad_token_id == 50256 and tokenizer.padding_side == "right"


def test_head_pad_id_differs_from_tokenizer(fixtures_root, workdir, capsys, heavy_work_forbidden):
    folder = copy_model(fixtures_root, "qqp", workdir / "pad0")
    edit_config(folder, pad_token_id=0)
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.finetuned.qqp", str(folder)))
    assert_short_error(code, err, "'qqp'", "pad_token_id", "50256", "0")


def test_tokenizer_larger_than_the_embedding(fixtures_root, workdir, capsys, heavy_work_forbidden):
    from mergelit.glue import load_tokenizer

    tokenizer = load_tokenizer(str(fixtures_root / "pool" / "pretrained"))
    tokenizer.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    tokenizer.save_pretrained(workdir / "big_tokenizer")
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--pool.tokenizer", str(workdir / "big_tokenizer")))
    assert_short_error(code, err, "big_tokenizer", "50259", "50257")


def test_swapped_checkpoints_are_detected_by_label_names(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(
        capsys,
        *cli_args(fixtures_root, "--pool.finetuned.cola", str(fixtures_root / "pool" / "sst2"),
                   "--pool.finetuned.sst2", str(fixtures_root / "pool" / "cola")),
    )
    assert_short_error(code, err, "'cola'", "swapped", "negative")


# ---- 10. data ----------------------------------------------------------------------------------
def _drop_split(d):
    d.pop("validation")
    return d


def _relabel(value):
    import datasets

    def relabel(d):
        d = d.cast_column("label", datasets.Value("int64"))  # a ClassLabel would refuse 5 itself
        return d.map(lambda row, i: {"label": value if i == 3 else row["label"]}, with_indices=True)

    return relabel


@pytest.mark.parametrize(
    "case, edit, needles",
    [
        ("missing task", None, ["'mrpc'", "task folder"]),
        ("missing split", _drop_split, ["'mrpc'", "'validation'"]),
        ("missing column", lambda d: d.remove_columns("sentence2"), ["'mrpc'", "sentence2"]),
        ("label 5", _relabel(5), ["'mrpc'", "'validation'", "'label' row 3 is 5", "0..1"]),
        ("label -1", _relabel(-1), ["'mrpc'", "'validation'", "row 3 is -1", "unlabelled test rows"]),
        ("empty split", lambda d: {**d, "validation": d["validation"].select([])}, ["'mrpc'", "empty"]),
    ],
)
def test_bad_data_folder(case, edit, needles, fixtures_root, workdir, capsys, heavy_work_forbidden):
    import datasets

    if case == "missing task":
        data = copy_data(fixtures_root, workdir / "glue")
        shutil.rmtree(data / "mrpc")
    else:
        data = copy_data(fixtures_root, workdir / "glue", "mrpc", lambda d: datasets.DatasetDict(dict(edit(d))))
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--data.path", str(data)))
    assert_short_error(code, err, *needles)


def test_train_split_checked_before_statistics(fixtures_root, workdir, capsys, heavy_work_forbidden):
    import datasets

    def drop_train(d):
        d.pop("train")
        return d

    data = copy_data(fixtures_root, workdir / "glue", "sst2", lambda d: datasets.DatasetDict(dict(drop_train(d))))
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--data.path", str(data), method=CONFIGS / "methods" / "fisher_merging.yaml"))
    assert_short_error(code, err, "'sst2'", "'train'")


# ---- 11. max_length ------------------------------------------------------------------------------
def test_max_length_above_n_positions(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--data.max_length", "2048"))
    assert_short_error(code, err, "max_length 2048", "n_positions 512")


# ---- 12. method arguments ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, key, value, needle",
    [
        ("task_arithmetic", "scaling_factor", "inf", "scaling_factor"),
        ("ties_merging", "threshold", "0", "threshold"),
        ("ties_merging", "threshold", "101", "threshold"),
        ("ties_merging", "merge_func", "median", "merge_func"),
        ("dare_task_arithmetic", "sparsity_ratio", "1.5", "sparsity_ratio"),
        ("dare_task_arithmetic", "sparsity_ratio", "nan", "sparsity_ratio"),
        ("fisher_merging", "num_fisher_examples", "0", "num_fisher_examples"),
        ("fisher_merging", "batch_size", "-1", "batch_size"),
        ("fisher_merging", "minimal_fisher_weight", "inf", "minimal_fisher_weight"),
        ("regmean", "reduce_non_diagonal_ratio", "1.5", "reduce_non_diagonal_ratio"),
        ("regmean", "num_regmean_examples", "-3", "num_regmean_examples"),
    ],
)
def test_method_argument_out_of_range(config, key, value, needle, fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *cli_args(fixtures_root, f"--model.init_args.{key}", value, method=CONFIGS / "methods" / f"{config}.yaml"))
    assert_short_error(code, err, needle, value if value not in ("inf", "nan") else "")


def test_more_statistics_examples_than_the_split_clip_with_a_warning(fixtures_root):
    from mergelit.statistics import draw_examples

    assert sorted(draw_examples(5, 100, seed=0)) == [0, 1, 2, 3, 4]


# ---- 13. RegMean / Fisher numerics ---------------------------------------------------------------
def _regmean_inputs(gram):
    pretrained = {"h.0.mlp.c_fc.weight": torch.zeros(4, 3), "h.0.ln_1.weight": torch.ones(4)}
    torch.manual_seed(0)
    finetuned = {t: {k: v + torch.randn_like(v) for k, v in pretrained.items()} for t in ("cola", "sst2")}
    grams = {t: {"h.0.mlp.c_fc": gram} for t in ("cola", "sst2")}
    return finetuned, grams


def test_regmean_ill_conditioned_gram_names_the_layer():
    from mergelit.methods.regmean import MAX_CONDITION_NUMBER, gram_condition_number, regmean_merge

    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    gram = x.T @ x + 1e-15 * torch.eye(4, dtype=torch.float64)  # nearly singular: κ ≈ 3e15
    assert gram_condition_number(gram) > MAX_CONDITION_NUMBER
    with pytest.raises(MergeFailed, match=r"'h\.0\.mlp\.c_fc'.*ill-conditioned.*reduce_non_diagonal_ratio < 1"):
        regmean_merge(*_regmean_inputs(gram), reduce_non_diagonal_ratio=1.0)
    # A well-conditioned Gram merges, and with r < 1 the same nearly singular one is fine.
    assert gram_condition_number(torch.eye(4, dtype=torch.float64) * 3) == pytest.approx(1.0)
    merged = regmean_merge(*_regmean_inputs(gram), reduce_non_diagonal_ratio=0.6)
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_fisher_all_zero_estimate_names_the_model():
    from mergelit.methods.fisher import fisher_merge

    pretrained = {"h.0.attn.c_attn.weight": torch.zeros(4, 12)}
    finetuned = {t: {"h.0.attn.c_attn.weight": torch.randn(4, 12)} for t in ("cola", "rte")}
    fishers = {"cola": {"h.0.attn.c_attn.weight": torch.rand(4, 12)}, "rte": {"h.0.attn.c_attn.weight": torch.zeros(4, 12)}}
    with pytest.raises(MergeFailed, match=r"'rte' model is zero everywhere"):
        fisher_merge(pretrained, finetuned, fishers)


# ---- 14. unwritable outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--report_save_path", "--merged_model_save_path", "--data.cache_dir", "--trainer.logger.init_args.save_dir"])
def test_unwritable_output_fails_before_the_merge(option, fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "a_file").write_text("not a folder")
    path = str(workdir / "a_file" / "out")
    code, err = mergelit(capsys, *cli_args(fixtures_root, option, path))
    assert_short_error(code, err, path, "cannot be written", "a_file")


# ---- 15. partial and stale results ---------------------------------------------------------------
def test_partial_evaluation_is_marked_and_never_trusted(fixtures_root, workdir, capsys):
    from mergelit import tables

    code, err = mergelit(capsys, *cli_args(fixtures_root, "--trainer.limit_test_batches", "1", "--report_save_path", str(workdir / "r.json")))
    assert code == 0, err
    report = json.loads((workdir / "r.json").read_text())
    assert report["protocol"]["partial"] is True
    with pytest.raises(ValueError, match="partial evaluation"):
        tables.load_report(workdir / "r.json")


def test_sweep_fingerprint_covers_the_weights(fixtures_root, workdir):
    from mergelit.grid import weights_fingerprint
    from mergelit.pool import ModelPool

    folder = copy_model(fixtures_root, "cola", workdir / "cola")
    make = lambda: ModelPool(str(fixtures_root / "pool" / "pretrained"), {"cola": str(folder)})  # noqa: E731
    before = weights_fingerprint(make())
    assert before == weights_fingerprint(make())
    edit_weights(folder, lambda t: t["score.weight"].mul_(2))  # replaced at the same path
    after = weights_fingerprint(make())
    assert after["weights.cola"] != before["weights.cola"] and after["weights.pretrained"] == before["weights.pretrained"]


def test_damaged_tokenized_cache_is_rebuilt(fixtures_root, workdir):
    from mergelit.glue import GLUEDataModule

    make = lambda: GLUEDataModule(["rte"], str(fixtures_root / "pool" / "pretrained"), str(fixtures_root / "glue"), cache_dir=str(workdir / "cache"))  # noqa: E731
    first = list(make().eval_dataset("rte")["input_ids"])
    (cache_file,) = [p for p in (workdir / "cache").glob("rte-*.arrow")]
    data = cache_file.read_bytes()
    cache_file.unlink()  # (a new file: the first dataset still maps the old one)
    cache_file.write_bytes(data[:100])  # a run killed mid-write, or a bad disk
    with pytest.warns(UserWarning, match="damaged"):
        again = list(make().eval_dataset("rte")["input_ids"])
    assert again == first


# ---- 16. config files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needles",
    [
        ("model: [unclosed\n", ["bad.yaml", "not valid YAML", "line 2"]),
        ("", ["bad.yaml", "empty"]),
        ("pool:\n  pretraned: x\n", ["pretraned", "Did you mean 'pool.pretrained'?"]),
        ("model:\n  init_args:\n    scaling_factr: 0.3\n", ["scaling_factr", "Did you mean 'scaling_factor'"]),
        ("[1, 2]\n", ["bad.yaml", "not a mapping"]),
    ],
)
def test_bad_config_file(text, needles, fixtures_root, workdir, capsys, heavy_work_forbidden):
    (workdir / "bad.yaml").write_text(text)
    code, err = mergelit(capsys, *cli_args(fixtures_root), "-c", str(workdir / "bad.yaml"))
    assert_short_error(code, err, *needles)


def test_misspelt_command_line_option_suggests_the_key(fixtures_root, workdir, capsys, heavy_work_forbidden):
    code, err = mergelit(capsys, *cli_args(fixtures_root, "--data.batchsize", "3"))
    assert_short_error(code, err, "batchsize", "Did you mean 'data.batch_size'?")


def test_missing_config_file(fixtures_root, workdir, capsys):
    code, err = mergelit(capsys, *cli_args(fixtures_root), "-c", "configs/methods/tie_merging.yaml")
    assert_short_error(code, err, "tie_merging.yaml", "does not exist")


# ---- 17. several processes -----------------------------------------------------------------------
def test_more_processes_than_batches_is_exact_or_refused(fixtures_root, workdir, capsys):
    """3 CPU processes, 1 batch per task (batch 64 > 61 rows): ranks 1 and 2 score nothing. The report
    equals the one-process report exactly, or the run stops with a clear error."""
    extra = ("--data.batch_size", "64", "--trainer.logger", "false")
    code, err = mergelit(capsys, *cli_args(fixtures_root, *extra, "--report_save_path", str(workdir / "one.json")))
    assert code == 0, err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "mergelit", *cli_args(fixtures_root, *extra, "--trainer.devices", "3", "--trainer.strategy", "ddp",
                                                     "--report_save_path", str(workdir / "three.json"))],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    if done.returncode == 0:
        one, three = (json.loads((workdir / f"{n}.json").read_text()) for n in ("one", "three"))
        for task in GLUE_TASKS:
            assert three[task]["accuracy"] == one[task]["accuracy"], task
            assert three[task]["loss"] == pytest.approx(one[task]["loss"], rel=1e-6), task
    else:
        assert "Traceback" not in done.stderr and "mergelit: error:" in done.stderr, done.stderr[-3000:]
