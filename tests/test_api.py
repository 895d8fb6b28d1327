"""mergelit from Python: the README's example runs as written and gives the CLI's numbers; the
package imports light; every public name is in ``__all__``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergelit
from mergelit.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_import_mergelit_loads_no_torch():
    code = "import sys, mergelit; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; print(sorted(mergelit.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves():
    for name in mergelit.__all__:
        assert getattr(mergelit, name) is not None, name
    with pytest.raises(AttributeError):
        mergelit.no_such_name  # noqa: B018


def test_the_readme_example_runs_as_written_and_matches_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)  # noqa: S102
    report = namespace["report"]
    main(["test", "-c", str(tmp_path / "fixtures" / "config.yaml"), "-c", str(ROOT / "configs" / "methods" / "ties_merging.yaml"),
          "--model.init_args.scaling_factor", "0.6", "--trainer.enable_progress_bar", "false",
          "--report_save_path", str(tmp_path / "cli.json")])
    cli = json.loads((tmp_path / "cli.json").read_text())
    for entry in (*mergelit.TASKS, "average"):
        assert report[entry]["accuracy"] == cli[entry]["accuracy"], entry
        assert report[entry]["loss"] == pytest.approx(cli[entry]["loss"], rel=1e-5), entry
    card = (tmp_path / "merged" / "ties" / "cola" / "README.md").read_text()
    assert "TIES-Merging" in card and "scaling_factor" in card and "sha256" in card


def test_merge_and_classifiers(pool_paths):
    pool = mergelit.ModelPool(**pool_paths)
    body = mergelit.merge(pool, "TaskArithmetic", scaling_factor=0.4)
    reference = mergelit.method(pool, "task_arithmetic", scaling_factor=0.4).merge()
    assert all(torch.equal(body[k], reference[k]) for k in reference)
    models = mergelit.classifiers(pool, body)
    assert list(models) == pool.tasks
    assert torch.equal(models["rte"].transformer.wte.weight, body["wte.weight"])
    assert torch.equal(models["rte"].score.weight, pool.head("rte"))
    with pytest.raises(ValueError, match="No merge method is called 'ties_mergin'.*Did you mean"):
        mergelit.method(pool, "ties_mergin")
    with pytest.raises(ValueError, match="no single merged body"):
        mergelit.merge(pool, "SimpleEnsemble")


def test_data_driven_methods_need_data(pool_paths):
    pool = mergelit.ModelPool(**pool_paths)
    with pytest.raises(ValueError, match="reads data.*GLUEDataModule"):
        mergelit.merge(pool, "FisherMerging")
