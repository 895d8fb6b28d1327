"""One data check for every split a run reads (``mergelit.glue.check_split``), before the run.

A property test draws bad data sets (a text column's values of the wrong type or empty, label
values that are no class) and asserts the check either passes, and then the data scores as the
clean data does, or fails before any scoring with a message naming the task, the split, the column
and the row. The end-to-end cases show the run stops before the merge.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import datasets
import lightning as L
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergelit.__main__ import main
from mergelit.errors import BadData
from mergelit.glue import check_split
from mergelit.tasks import GLUE_TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def split_of(task: str, texts: dict[str, list], labels: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict({**texts, "label": labels})


def clean_rows(task: str, n: int = 6):
    fields = GLUE_TASKS[task].text_fields
    return {f: [f"row {i} of {f}" for i in range(n)] for f in fields}, [i % GLUE_TASKS[task].num_labels for i in range(n)]


BAD_TEXTS = {"None": None, "bytes": b"raw bytes", "a number": 7, "empty": "", "spaces": "   "}
LABELS = {"a fraction": 0.7, "NaN": math.nan, "minus one": -1, "too large": 5, "a string": "1", "a bool": True,
          "a whole float": 1.0}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=st.sampled_from(sorted(GLUE_TASKS)),
    row=st.integers(0, 5),
    text=st.one_of(st.none(), st.sampled_from(sorted(BAD_TEXTS))),
    label=st.one_of(st.none(), st.sampled_from(sorted(LABELS))),
    all_segments=st.booleans(),
)
def test_bad_values_fail_naming_task_split_column_and_row_or_pass_clean(task, row, text, label, all_segments):
    texts, labels = clean_rows(task)
    fields = GLUE_TASKS[task].text_fields
    edited = fields if all_segments else fields[:1]
    if text is not None:
        for field in edited:
            texts[field][row] = BAD_TEXTS[text]
    if label is not None:
        labels[row] = LABELS[label]
    try:
        dataset = split_of(task, texts, labels)
    except Exception:  # Arrow itself refuses a column of mixed types (bytes among strings ...): not our case
        return
    text_bad = text in ("None", "bytes", "a number") or (text in ("empty", "spaces") and (all_segments or len(fields) == 1))
    label_bad = label is not None and label != "a whole float"
    if not text_bad and not label_bad:
        check_split(dataset, task, "validation", "data")  # passes: the values are usable as they are
        return
    with pytest.raises(BadData) as error:
        check_split(dataset, task, "validation", "data")
    message = str(error.value)
    assert f"Task {task!r} split 'validation'" in message
    typed = {f: getattr(dataset.features[f], "dtype", None) for f in fields}
    if text_bad and any(t not in ("string", "large_string") for t in typed.values()):
        column = next(f for f in fields if typed[f] not in ("string", "large_string"))
        assert f"column {column!r} holds" in message and "not text" in message  # the whole column's type
        return
    assert f"row {row}" in message
    if text_bad and text in ("None", "bytes", "a number"):
        assert f"column {edited[0]!r}" in message  # the first bad column is the one named
    elif text_bad:
        assert "no text" in message
    else:
        assert "column 'label'" in message


def test_an_empty_split_is_named():
    with pytest.raises(BadData, match=r"Task 'rte' split 'train' in 'data' is empty"):
        check_split(split_of("rte", {"sentence1": [], "sentence2": []}, []), "rte", "train", "data")


@pytest.fixture
def no_scoring(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the run started scoring before the data check fired")

    for name in ("test", "predict", "fit"):
        monkeypatch.setattr(L.Trainer, name, forbidden)


@pytest.mark.parametrize(
    "task, split, edit, needles",
    [
        ("mnli", "validation_mismatched", lambda d: d.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1}),
         ["'mnli'", "'validation_mismatched'", "row 0 is -1"]),
        ("sst2", "validation", lambda d: d.map(lambda r, i: {"sentence": "" if i == 4 else r["sentence"]}, with_indices=True),
         ["'sst2'", "'validation'", "row 4 has no text"]),
        ("cola", "train", lambda d: d.cast_column("label", datasets.Value("float64")).map(lambda r, i: {"label": 0.7 if i == 2 else r["label"]}, with_indices=True),
         ["'cola'", "'train'", "'label' row 2 is 0.7"]),
    ],
)
def test_a_bad_split_stops_the_run_before_scoring(task, split, edit, needles, fixtures_root, tmp_path, monkeypatch, capsys, no_scoring):
    monkeypatch.chdir(tmp_path)
    datasets.disable_progress_bar()
    data = tmp_path / "glue"
    shutil.copytree(Path(fixtures_root) / "glue", data)
    loaded = datasets.load_from_disk(str(data / task))
    datasets.DatasetDict({**loaded, split: edit(loaded[split])}).save_to_disk(str(tmp_path / "edited"))
    del loaded
    shutil.rmtree(data / task)
    shutil.move(str(tmp_path / "edited"), str(data / task))
    method = CONFIGS / "methods" / ("fisher_merging.yaml" if split == "train" else "task_arithmetic.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(method), "--data.path", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mergelit: error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
