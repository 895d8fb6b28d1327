"""Export: the merged body with each task's head as plain transformers checkpoints, with their provenance.

``folder/<task>/`` is a ``GPT2ForSequenceClassification`` checkpoint with a Hub model card (``README.md``) and
``mergelit_config.yaml``, the resolved config that merges the same weights again (docs/data.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from torch import Tensor

from mergelit.errors import NotWritable
from mergelit.pool import ModelPool
from mergelit.tasks import GLUE_TASKS

CONFIG_FILE = "mergelit_config.yaml"  # the resolved config in every exported task folder: marks a mergelit export


@dataclass
class Provenance:
    """How an exported model was made: what the model card and the config file record."""

    report: dict[str, Any] = field(default_factory=dict)
    config_yaml: Optional[str] = None
    command: Optional[str] = None


def check_export_folder(folder: str | os.PathLike) -> None:
    """Refuse an export folder that is a file, a link, or holds anything but an earlier mergelit export."""
    folder = Path(folder)
    if folder.is_symlink():
        raise NotWritable(f"The export folder {str(folder)!r} is a link; give a real folder.")
    if folder.exists() and not folder.is_dir():
        raise NotWritable(f"The export folder {str(folder)!r} is a file; give a folder (--merged_model_save_path).")
    if not folder.is_dir():
        return
    foreign = [entry.name for entry in sorted(folder.iterdir())
               if not (entry.is_dir() and not entry.is_symlink() and entry.name in GLUE_TASKS
                       and (entry / CONFIG_FILE).is_file())
               and not entry.name.startswith(".mergelit-export-")]  # save_merged's staging folders
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise NotWritable(f"The export folder {str(folder)!r} already holds {shown}, which is not a mergelit export; "
                          f"choose an empty or new folder (--merged_model_save_path).")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(pool: ModelPool) -> dict[str, dict[str, Any]]:
    """Each model of the pool: its source (hub id or folder) and the sha256 of each weight file."""
    sources = {"pretrained": pool.pretrained_path, **pool.finetuned_paths}
    out = {}
    for name, source in sources.items():
        checkpoint = pool._pretrained_checkpoint() if name == "pretrained" else pool._finetuned_checkpoint(name)
        files = sorted(set(checkpoint.files.values()))
        out[name] = {"source": source, "files": {os.path.basename(f): file_sha256(f) for f in files}}
    return out


def _front_matter(method: str, pool: ModelPool, task: str, report: dict[str, Any]) -> str:
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["merge", "mergelit", "gpt2", "glue", method.lower().replace(" ", "-")],
            "base_model": [pool.pretrained_path, *pool.finetuned_paths.values()], "base_model_relation": "merge",
            "datasets": ["nyu-mll/glue"]}
    if task in report and "accuracy" in report[task]:
        info = GLUE_TASKS[task]
        dataset = {"type": "nyu-mll/glue", "name": f"GLUE {info.title}", "config": task, "split": info.eval_split}
        metrics = [{"type": name, "value": value} for name, value in report[task].items() if name != "loss"]
        results = [{"task": {"type": "text-classification"}, "dataset": dataset, "metrics": metrics}]
        meta["model-index"] = [{"name": f"{method} ({task})", "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(task: str, pool: ModelPool, provenance: Provenance, weights: dict[str, dict[str, Any]]) -> str:
    """The Hub model card (README.md) of ``task``'s exported model."""
    from mergelit import __version__
    report = provenance.report or {}
    protocol = report.get("protocol") or {}
    method = protocol.get("method", "merge")
    task_aware = protocol.get("kind") == "task-aware"
    bodies = "a body of its own per task" if task_aware else "the same merged body for every task"
    lines = [
        _front_matter(method, pool, task, report),
        f"# {method}: GPT-2 for GLUE {GLUE_TASKS[task].title}", "",
        f"The GPT-2 body merged by **{method}** (mergelit {__version__}) from the pretrained model and "
        f"{len(pool.tasks)} fine-tuned GLUE classifiers, with the fine-tuned **{task}** head ({bodies}).", "",
        "## Method", "",
        f"- class: `{protocol.get('class_path', '?')}`",
        f"- hyperparameters: `{json.dumps(protocol.get('hyperparameters', {}), sort_keys=True)}`",
        f"- data read beside the weights: {protocol.get('data', 'none')}", "",
        "## Pool (sources and sha256 of each weight file)", "",
        "| model | source | file | sha256 |", "|---|---|---|---|",
    ]
    for name, entry in weights.items():
        for file, digest in entry["files"].items():
            lines.append(f"| {name} | `{entry['source']}` | {file} | `{digest}` |")
    tasks = [t for t in report if t in GLUE_TASKS]
    if tasks:
        lines += ["", "## Results (GLUE validation; accuracy as a fraction)", "",
                  "| task | accuracy | loss | other |", "|---|---|---|---|"]
        for t in [*tasks, *(e for e in ("average", "mnli_mismatched") if e in report)]:
            values = report[t]
            other = ", ".join(f"{k} {v:.4f}" for k, v in values.items()
                              if k not in ("accuracy", "loss") and isinstance(v, float))
            loss = values.get("loss")
            lines.append(f"| {t} | {values['accuracy']:.4f} | {'' if loss is None else f'{loss:.4f}'} | {other} |")
    lines += ["", "## Protocol", "", "```json", json.dumps(protocol, indent=1, sort_keys=True, default=str), "```", ""]
    lines += ["## Reproduce", ""]
    if provenance.command:
        lines += ["The command that made this model:", "", "```bash", provenance.command, "```", ""]
    lines += ["The same weights, bit for bit, from the resolved config in this folder:", "", "```bash",
              f"mergelit test -c {CONFIG_FILE} --merged_model_save_path <new folder>", "```", ""]
    return "\n".join(lines)


def save_merged(folder: str | os.PathLike, pool: ModelPool, body_of: Callable[[str], dict[str, Tensor]],
                provenance: Optional[Provenance] = None) -> list[Path]:
    """Write ``folder/<task>/`` for every task of ``pool``: the body ``body_of(task)`` (task-aware methods: the
    task's own) with the task's head, its model card and the run's config; each swapped in when complete."""
    from transformers import GPT2ForSequenceClassification
    check_export_folder(folder)
    folder = Path(folder)
    provenance = provenance or Provenance()
    tokenizer = pool.load_tokenizer()
    weights = weight_files(pool)
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for task in pool.tasks:
            body_state = {k: v.detach().cpu() for k, v in body_of(task).items()}
            with torch.device("meta"):
                model = GPT2ForSequenceClassification(pool.task_config(task))
            state = {f"transformer.{k}": v.clone() for k, v in body_state.items()}
            state["score.weight"] = pool.head(task).detach().cpu().clone()
            model.load_state_dict(state, strict=True, assign=True)
            staging = folder / f".mergelit-export-{task}"
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "README.md").write_text(model_card(task, pool, provenance, weights))
            (staging / CONFIG_FILE).write_text(provenance.config_yaml or "")
            out = folder / task
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
            written.append(out)
        for entry in folder.iterdir():
            if entry.name in GLUE_TASKS and entry.name not in pool.tasks and (entry / CONFIG_FILE).is_file():
                shutil.rmtree(entry)  # an earlier export's task this run does not have
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise NotWritable(f"Cannot write the export folder {str(folder)!r}: {reason}.") from None
    return written


def command_line() -> str:
    """The command this process runs, quoted for a shell."""
    program = "mergelit" if Path(sys.argv[0]).name in ("mergelit", "__main__.py") else Path(sys.argv[0]).name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def reproducible_config(config: dict[str, Any]) -> str:
    """The run's resolved config as YAML for an export: output paths left out (a rerun must not write
    over the export it reads) and local folders made absolute (so it runs from any directory)."""
    config = copy.deepcopy(config)
    for key in ("report_save_path", "merged_model_save_path", "config"):
        config.pop(key, None)

    def absolute(value):
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            return os.path.abspath(os.path.expanduser(value))
        return value

    for group, key in (("pool", "pretrained"), ("pool", "tokenizer"), ("data", "path"), ("data", "tokenizer")):
        if isinstance(config.get(group), dict) and key in config[group]:
            config[group][key] = absolute(config[group][key])
    finetuned = (config.get("pool") or {}).get("finetuned")
    if isinstance(finetuned, dict):
        config["pool"]["finetuned"] = {task: absolute(path) for task, path in finetuned.items()}
    header = "# The resolved config of the run that made this model: mergelit test -c mergelit_config.yaml\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
