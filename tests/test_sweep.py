"""`mergelit sweep`: one process, a report per point equal to a separate `mergelit test`, tables,
plots, W&B runs, resume, bad input; grids of methods each with its own range; the shipped sweep
configs (ours and W&B's) parse; close-key hints without patching the argument parser library."""

from __future__ import annotations

import csv
import json
import re
import struct
from pathlib import Path

import pytest
import yaml

from mergelit import sweep as sweep_module
from mergelit import tables
from mergelit.__main__ import main
from mergelit.cli import MergeCLI
from mergelit.tasks import TASKS, task_title
from mergelit.grid import prepare_folder
from mergelit.methods import method_classes
from mergelit.sweep import SweepRunner, every_method
from mergelit.tracking import has_wandb_key, wandb_logger

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_args(fixtures_root: Path, method: str, grid: dict, out: Path, *extra: str) -> list[str]:
    return ["sweep", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / f"{method}.yaml"),
            "--sweep.grid", json.dumps(grid), "--output_dir", str(out), *extra]


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that records each call; return the record."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), 7, b"", []  # 7: the ':W&B' file header
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": {}, "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":  # config set before the run record was written travels inside it
                run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
                run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                run["history"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "config":
                run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        runs.append(run)
    return runs


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.strip().splitlines()[2:]]


def test_three_point_sweep_in_one_process(fixtures_root, tmp_path, monkeypatch):
    """Three reports, a table equal to them, a plot, one W&B run per point in one group plus the
    table and plot; the pool loaded and the data tokenized once, TIES's election (τm) computed
    once; and each point equal to a separate `mergelit test` with that value."""
    import datasets

    from mergelit import pool as pool_module
    from mergelit.methods import ties

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loads = count_calls(monkeypatch, pool_module, "check_checkpoint_folder")  # once per checkpoint loaded
    tokenized = count_calls(monkeypatch, datasets.Dataset, "map")
    merged_tau = count_calls(monkeypatch, ties, "ties_election")
    out = tmp_path / "ties"
    grid = {"model.init_args.scaling_factor": [0.0, 0.5, 1.0]}
    main(sweep_args(fixtures_root, "ties_merging", grid, out, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger"))

    # Tokenized: every task's validation split, and MNLI's validation_mismatched.
    assert (len(loads), len(tokenized), len(merged_tau)) == (1 + len(TASKS), len(TASKS) + 1, 1)
    names = ["scaling_factor=0.0", "scaling_factor=0.5", "scaling_factor=1.0"]
    reports = {name: tables.load_report(out / f"{name}.json", TASKS) for name in names}
    assert reports["scaling_factor=0.0"] != reports["scaling_factor=1.0"]

    markdown = (out / "table.md").read_text()
    assert markdown.splitlines()[0] == "| λ | " + " | ".join(TASKS) + " | Avg. |"
    for row, (name, rep) in zip(table_rows(markdown), reports.items()):
        assert "scaling_factor=" + row[0] == name
        assert [float(c) for c in row[1:]] == pytest.approx([rep[k]["accuracy"] for k in [*TASKS, "average"]], abs=5e-7)
    for row, rep in zip(csv.DictReader((out / "table.csv").read_text().splitlines()), reports.values()):
        assert [float(row[k]) for k in [*TASKS, "average"]] == [rep[k]["accuracy"] for k in [*TASKS, "average"]]
    assert (out / "plot.png").read_bytes()[:8] == PNG

    runs = wandb_runs(tmp_path)
    points = [run for run in runs if run["job_type"] == "sweep-point"]
    assert sorted(run["name"] for run in points) == names
    assert len({run["group"] for run in runs}) == 1 and runs[0]["group"]
    for run in points:
        rep = reports[run["name"]]
        value = float(run["name"].split("=")[1])
        assert run["config"]["model.init_args.scaling_factor"] == value  # the point's value
        assert run["config"]["scaling_factor"] == value  # the method's hyperparameters
        for task in [*TASKS, "average"]:
            assert run["history"][f"test/{task}/accuracy"] == pytest.approx(rep[task]["accuracy"], rel=1e-6)
    (summary,) = [run for run in runs if run["job_type"] == "sweep-summary"]
    assert summary["history"]["sweep/table/_type"] == "table-file" and summary["history"]["sweep/table/nrows"] == 3
    assert summary["history"]["sweep/plot/_type"] == "image-file"

    # The same point as its own `mergelit test` run: the same report.
    separate = tmp_path / "separate.json"
    main(["test", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "methods" / "ties_merging.yaml"),
          "--model.init_args.scaling_factor", "0.5", "--report_save_path", str(separate)])
    alone, point = json.loads(separate.read_text()), reports["scaling_factor=0.5"]
    for report in (alone, point):  # everything but the measured costs (wall times, memory)
        del report["protocol"]["costs"]
    assert alone == point
    # The report carries its 95 % intervals (tasks and average), each around its accuracy.
    intervals = point["protocol"]["uncertainty"]["accuracy"]
    for task in [*TASKS, "average"]:
        assert intervals[task][0] <= point[task]["accuracy"] <= intervals[task][1]


def test_an_interrupted_sweep_resumes_with_the_missing_points(fixtures_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ta"
    # One batch per task: the numbers do not matter here, only which points run.
    args = sweep_args(fixtures_root, "task_arithmetic", {"model.init_args.scaling_factor": [0.0, 0.5, 1.0]}, out,
                      "--data.batch_size", "64")
    score_point, ran = SweepRunner.score_point, []

    def killed_after_the_first(self, point, *args, **kwargs):
        if ran:
            raise KeyboardInterrupt  # as Ctrl-C (or a crash) in the middle of the sweep
        ran.append(point.name)
        return score_point(self, point, *args, **kwargs)

    monkeypatch.setattr(SweepRunner, "score_point", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert sorted(p.name for p in out.glob("scaling_factor=*.json")) == ["scaling_factor=0.0.json"]
    first = out / "scaling_factor=0.0.json"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    (out / "scaling_factor=1.0.json").write_text('{"cola": {"accuracy": 0.5')  # a partial report: not trusted

    def counted(self, point, *args, **kwargs):
        ran.append(point.name)
        return score_point(self, point, *args, **kwargs)

    ran.clear()
    monkeypatch.setattr(SweepRunner, "score_point", counted)
    main(args)
    assert ran == ["scaling_factor=0.5", "scaling_factor=1.0"]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert [row[0] for row in table_rows((out / "table.md").read_text())] == ["0.0", "0.5", "1.0"]
    for name in ("scaling_factor=0.5", "scaling_factor=1.0"):
        tables.load_report(out / f"{name}.json", TASKS)

    ran.clear()
    main(args)  # all done: nothing runs, the table is rewritten from the reports
    assert ran == []

    # The same folder with another config: refused, naming what differs.
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--data.batch_size", "8"])
    assert exit_.value.code == 2
    assert re.search(r"(?s)data\.batch_size: 64 there, 8 now.*--overwrite", capsys.readouterr().err)


def test_individual_sweep_is_the_cross_task_table(fixtures_root, fixtures_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = ["cola", "mrpc", "rte"]
    out = tmp_path / "7x7"
    main(["sweep", "-c", str(fixtures_root / "config.yaml"), "-c", str(CONFIGS / "sweeps" / "individual_7x7.yaml"),
          "--pool.finetuned", json.dumps({t: fixtures_config["pool"]["finetuned"][t] for t in tasks}),
          "--sweep.grid", json.dumps({"model.init_args.task": tasks}), "--output_dir", str(out)])
    reports = {t: tables.load_report(out / f"task={t}.json", tasks) for t in tasks}
    markdown = (out / "table.md").read_text()
    assert markdown.splitlines()[0] == "| Model | CoLA | MRPC | RTE | Avg. |"
    for row, (task, rep) in zip(table_rows(markdown), reports.items()):
        assert row == [task_title(task), *(f"{100 * rep[k]['accuracy']:.1f}" for k in [*tasks, "average"])]
    assert (out / "plot.png").read_bytes()[:8] == PNG
    # `compare` reads the diagonal: each task under its own fine-tuned body.
    (row,) = tables.collect_rows([out])
    assert row.labels == ["Fine-tuned (individual)"] and row.role == "individual"
    assert [row.report[t]["accuracy"] for t in tasks] == [reports[t][t]["accuracy"] for t in tasks]


@pytest.mark.parametrize(
    "grid, error, match",
    [
        ({"model.init_args.scaling_factr": [0.1]}, ValueError, r"'model.init_args.scaling_factr'.*model\.init_args\.scaling_factor"),
        ({"model.init_args.scaling_factor": []}, ValueError, r"scaling_factor'\] is \[\]: give a non-empty list"),
        ({"model.init_args.scaling_factor": [0.1, "high"]}, ValueError, r"must list numbers.*'high' \(str\)"),
        ({"model.init_args.scaling_factor": [0.1, 0.1]}, ValueError, r"point 'scaling_factor=0.1' twice"),
        ({}, ValueError, "sweep.grid is empty"),
        # Every point's config is parsed before the first runs: a value its type refuses names the point.
        ({"model.init_args.scaling_factor": [0.1], "model.init_args.merge_func": ["sum", "median"]}, ValueError,
         r"Sweep point scaling_factor=0.1,merge_func=median .* is not a valid config"),
    ],
)
def test_bad_grids_fail_before_any_work(grid, error, match, fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = count_calls(monkeypatch, SweepRunner, "score_point")
    with pytest.raises(error, match=match):
        main(sweep_args(fixtures_root, "ties_merging" if "merge_func" in str(grid) else "task_arithmetic", grid, tmp_path / "out"))
    assert ran == [] and not (tmp_path / "out").exists()


def test_close_key_hints_come_from_mergelit_s_own_parser(fixtures_root, tmp_path, monkeypatch, capsys):
    """A misspelt option gets its hint from the sweep's parser (one line, exit 2), and the argument
    parser library is left as it is (no process-wide patch)."""
    import jsonargparse

    original = jsonargparse.ArgumentParser.error
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(sweep_args(fixtures_root, "task_arithmetic", {"model.init_args.scaling_factor": [0.1]}, tmp_path / "out",
                        "--data.batchsize", "3"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("mergelit: error:") and "Did you mean 'data.batch_size'?" in err
    assert jsonargparse.ArgumentParser.error is original


def test_a_method_with_its_own_grid_is_one_group():
    """`model: [{class_path, grid: {...}}]`: one point per value, named by the swept argument even at its
    default, all of one method group; a method without a grid is a group of its own."""
    points = sweep_module.grid_points({"model": [
        {"class_path": "mergelit.methods.TaskArithmetic", "grid": {"scaling_factor": [0.3, 0.6]}},
        {"class_path": "mergelit.methods.TiesMerging", "init_args": {"threshold": 10}, "grid": {"scaling_factor": [0.3]}},
        {"class_path": "mergelit.methods.SimpleAverage"},
    ]})
    assert [p.name for p in points] == [
        "TaskArithmetic(scaling_factor=0.3)", "TaskArithmetic(scaling_factor=0.6)",
        "TiesMerging(threshold=10,scaling_factor=0.3)", "SimpleAverage",
    ]
    assert [p.group for p in points] == ["Task Arithmetic", "Task Arithmetic", "TIES-Merging (k=10)", "Simple Average"]
    assert points[2].overrides["model"] == {"class_path": "mergelit.methods.TiesMerging",
                                           "init_args": {"threshold": 10, "scaling_factor": 0.3}}
    assert points[0].swept == ("scaling_factor",) and points[3].swept == ()
    with pytest.raises(ValueError, match="non-empty list"):
        sweep_module.grid_points({"model": [{"class_path": "mergelit.methods.TaskArithmetic", "grid": {"scaling_factor": []}}]})


def test_a_sweep_without_a_method_says_so(fixtures_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(fixtures_root / "config.yaml"), "--sweep.grid", '{"model.init_args.scaling_factor": [0.1]}']
    with pytest.raises(ValueError, match="No method is configured"):
        SweepRunner(args).plan()


def test_overwrite_replaces_another_configs_results(tmp_path):
    points = sweep_module.grid_points({"model.init_args.scaling_factor": [0.0]})
    old = {"fingerprint": "old", "grid_keys": ["k"], "config": {"data.batch_size": 8}, "points": {"scaling_factor=0.0": {}}}
    new = {**old, "fingerprint": "new", "config": {"data.batch_size": 16}}
    (tmp_path / tables.MANIFEST).write_text(json.dumps(old))
    (tmp_path / "scaling_factor=0.0.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="data.batch_size: 8 there, 16 now"):
        prepare_folder(tmp_path, new, points, overwrite=False)
    prepare_folder(tmp_path, new, points, overwrite=True)
    assert json.loads((tmp_path / tables.MANIFEST).read_text())["fingerprint"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", tables.MANIFEST]  # only the sweep's files go


def tuned_points() -> int:
    """Points of ``model: tuned``: one per value of each method's ``search`` range, one per method without."""
    return sum(len(next(iter(cls.search.values()), [None])) for cls in method_classes() if cls.comparison)


@pytest.mark.parametrize(
    "configs, compare, key, count",
    [
        (["methods/task_arithmetic.yaml", "sweeps/scaling_factor.yaml"], False, "model.init_args.scaling_factor", 11),
        (["methods/ties_merging.yaml", "sweeps/scaling_factor.yaml"], False, "model.init_args.scaling_factor", 11),
        (["sweeps/individual_7x7.yaml"], False, "model.init_args.task", 7),
        (["sweeps/methods.yaml"], True, "model", len(every_method())),  # `model: all`: every comparison method
        (["sweeps/methods_tuned.yaml"], True, "model", tuned_points()),  # `model: tuned`: each method with its own range
    ],
)
def test_shipped_sweep_configs_plan_their_points(configs, compare, key, count):
    args = ["-c", str(CONFIGS / "gpt2_glue.yaml")] + [a for c in configs for a in ("-c", str(CONFIGS / c))]
    cli = SweepRunner(args, compare=compare)
    grid, points, point_configs = cli.plan()
    assert list(grid) == [key] and len(points) == count
    for point, config in zip(points, point_configs):
        value = config[key].as_dict() if key == "model" else config[key]
        expected = point.overrides[key]
        if key == "model":
            assert value["class_path"] == expected["class_path"]
        else:
            assert value == expected
    assert cli.config.sweep.percent == (key != "model.init_args.scaling_factor")
    if "methods_tuned.yaml" in configs[0]:  # one group per listed method; selected on the held-out dev rows
        assert len({p.group for p in points}) == len(every_method())
        assert cli.config.sweep.select_on == "dev" and cli.config.data.hold_out_dev
        assert cli.config.data.dev_source == "validation"


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.wandb.yaml")), ids=lambda p: p.name)
def test_wandb_sweep_configs_call_mergelit_test_with_cli_arguments(path, monkeypatch):
    """What `wandb agent` would run parses with MergeCLI, each value landing on its config key."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    monkeypatch.chdir(CONFIGS.parent)  # the commands' config paths are relative to the repository
    config = yaml.safe_load(path.read_text())
    assert config["method"] in ("grid", "random", "bayes")
    assert config["metric"] == {"name": "test/average/accuracy", "goal": "maximize"}  # what MergeMethod logs
    command = config["command"]
    assert command[:3] == ["${env}", "mergelit", "test"] and command[-1] == "${args}"
    for key, spec in config["parameters"].items():
        assert spec["values"]
        for value in spec["values"]:
            flags = create_sweep_command_args({"args": {key: {"value": value}}})["args"]
            cli = MergeCLI(args=[*command[3:-1], *flags])  # the arguments after `test`
            assert cli.config[key] == value
            assert type(cli.trainer.logger).__name__ == "WandbLogger"


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    """The WandbLogger instantiator: offline when W&B finds no key and no mode is chosen, else as configured."""

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert not has_wandb_key()
    assert wandb_logger(Recorder, project="p").kwargs == {"project": "p", "offline": True}
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert has_wandb_key() and wandb_logger(Recorder, project="p").kwargs == {"project": "p"}  # a key: online
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_logger(Recorder).kwargs == {}  # the user's choice stands
