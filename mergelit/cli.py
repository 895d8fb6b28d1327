"""``MergeCLI``: the LightningCLI parser and instantiation of ``mergelit test`` (and of each sweep point).

Config groups: ``pool:`` (ModelPool, linked into the method, and its tasks and tokenizer into the
data, so every part uses one task order), ``model:`` (a MergeMethod subclass), ``data:``
(GLUEDataModule), ``trainer:``. A sweep holds a parse-only ``MergeCLI`` (``mergelit.sweep``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
from typing import Any, Callable, Optional

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mergelit.configfile import yaml_file
from mergelit.errors import MergelitError
from mergelit.export import reproducible_config
from mergelit.glue import GLUEDataModule
from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool, fusionbench_pool_args, is_fusionbench_pool, tokenizer_path
from mergelit.run import run_test
from mergelit.tasks import ordered_tasks
from mergelit.tracking import wandb_logger, wandb_logger_class

TRAINER_DEFAULTS = {
    # Logs, config.yaml and report.json go to ./lightning_logs/version_N/.
    # RunLogger is Lightning's CSVLogger with each version folder claimed atomically.
    "logger": {"class_path": "mergelit.report.RunLogger", "init_args": {"save_dir": "."}},
    # Our loaders shard length-sorted batches by rank themselves; Lightning's
    # DistributedSampler would pad the last shard with repeated examples.
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
}

# `mergelit test`'s own options: name -> (type, default, help).
TEST_OPTIONS = {
    "export.wandb_artifact": (bool, False, "Also log the exported model folder (--merged_model_save_path) as a W&B "
                              "artifact, to each W&B logger of the run (offline without an API key)."),
    "report_save_path": (Optional[str], None, "Also write the report JSON here (FusionBench's option name); it is "
                         "always written to the run's log dir as report.json."),
    "merged_model_save_path": (Optional[str], None, "Export the merged model: DIR/<task>/ is a complete "
                               "GPT2ForSequenceClassification checkpoint (merged body + that task's head, config, "
                               "tokenizer, safetensors)."),
    "save_predictions": (bool, False, "Also write per-example predictions (idx, label, predicted class, logits), one "
                         "JSON-lines file per task, to predictions/<task>.jsonl next to the report (log dir and "
                         "--report_save_path)."),
    "verbose": (bool, False, "Also print Lightning's own results table (every metric once per task loader)."),
    "extra_metrics": (bool, True, "The printed table's column of CoLA MCC and MRPC/QQP F1 (the report always holds "
                      "them)."),
    "fused_gelu": (bool, False, "Score with torch's fused tanh GELU instead of transformers' Python formula: faster on "
                   "CPU; logits change in the last bits (benchmarks/gelu.py measures it), so it is off by default."),
}


def add_options(parser, options: dict[str, tuple]) -> None:
    for name, (kind, default, text) in options.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)


def import_object(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def fusionbench_args(args):
    """The command line with FusionBench pool files (``--pool FILE``, or ``-c FILE`` holding one under
    ``pool:``) turned into mergelit's ``pool:`` group, as the YAML strings jsonargparse accepts in place
    of a file (``pool.fusionbench_pool_args``). Everything else passes unchanged (dicts and Namespaces too)."""
    if not isinstance(args, (list, tuple)):
        return args
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--pool", "-c", "--config") and (eq or i + 1 < len(args)):
            value = value if eq else args[i + 1]
            content = yaml_file(value)  # a key (a task) given twice in a mapping is refused
            if name == "--pool" and is_fusionbench_pool(content):
                value = json.dumps(fusionbench_pool_args(content))
            elif name != "--pool" and isinstance(content, dict) and is_fusionbench_pool(content.get("pool")):
                value = json.dumps({**content, "pool": fusionbench_pool_args(content["pool"])})
            out.extend([f"{name}={value}"] if eq else [name, value])
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


def tasks_of(finetuned: dict) -> list[str]:
    """``data.tasks`` from ``pool.finetuned``: its task names in the canonical order."""
    return ordered_tasks(list(finetuned or {}))


_UNKNOWN_KEY = (
    (re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"unrecognized arguments: --([\w.]+)"), lambda m: m[1]),
    (re.compile(r"[Kk]ey '([\w.]+)' is not expected"), lambda m: m[1]),
)


def close_keys(parser, message: str) -> str:
    """`` Did you mean ...?`` for a misspelt config key or option in jsonargparse's ``message``."""
    nested = re.search(r"class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", message, re.S)
    if nested:  # a method argument: the candidates are the class's __init__ arguments
        try:
            arguments = list(inspect.signature(import_object(nested[1]).__init__).parameters)
        except (ImportError, AttributeError, ValueError):
            arguments = []
        matches = difflib.get_close_matches(nested[2], [a for a in arguments if a not in ("self", "pool")], n=3, cutoff=0.7)
        if matches:
            return f"\nDid you mean {' or '.join(map(repr, matches))} (an argument of {nested[1].rpartition('.')[2]})?"
    try:
        known = sorted(parser.get_defaults().keys())  # every dotted config key the parser knows
    except Exception:  # a parser whose defaults cannot be built: no suggestion
        known = []
    for pattern, key_of in _UNKNOWN_KEY:
        match = pattern.search(message)
        matches = difflib.get_close_matches(key_of(match), known, n=3, cutoff=0.75) if match else []
        if matches:
            return f"\nDid you mean {' or '.join(map(repr, matches))}?"
    return ""


class HintingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors end with ``Did you mean 'data.batch_size'?`` for a misspelt key."""

    def error(self, message: str, ex: Optional[Exception] = None):
        return super().error(message + close_keys(self, message), ex)


class MergeCLI(LightningCLI):
    """LightningCLI over a ``MergeMethod``, the GLUE DataModule and a ``pool:`` group: parses ``args`` (the
    command line after ``mergelit test``, or a dict/Namespace) and, unless not ``instantiate``, makes the
    objects; ``add_arguments(parser)`` adds more (a sweep's ``sweep:`` group and options)."""

    def __init__(
        self, args=None, instantiate: bool = True,
        add_arguments: Optional[Callable[[LightningArgumentParser], None]] = None, **kwargs,
    ):
        method_classes()  # import every method, so that short class names (`--model TiesMerging`) resolve
        args = fusionbench_args(args)
        self.instantiate = instantiate
        self.extra_arguments = add_arguments
        kwargs.setdefault("parser_class", HintingArgumentParser)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a rerun into the same log dir
        super().__init__(
            model_class=MergeMethod, subclass_mode_model=True, datamodule_class=GLUEDataModule,
            auto_configure_optimizers=False, args=args, run=False,
            # Methods are configured by the YAML, never restored from Lightning checkpoints.
            load_from_checkpoint_support=False, **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # As LightningCLI's, minus its warning about args given while sys.argv has some:
        # the `mergelit` command passes the arguments after `test`, on purpose.
        self.config = parse_config(parser, args)

    def instantiate_classes(self) -> None:
        # As LightningCLI's; a WandbLogger without an API key (and no mode chosen) logs offline instead of failing.
        if not self.instantiate:
            return
        instantiators = [(wandb_logger, wandb_logger_class(), True)]
        self.config_init = self.parser.instantiate(self.config, instantiators=instantiators)
        self.datamodule = self.config_init.get("data")
        self.model = self.config_init.get("model")
        self.trainer = self.instantiate_trainer()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(ModelPool, "pool")
        parser.link_arguments("pool", "model.init_args.pool", apply_on="instantiate")
        parser.link_arguments("pool.finetuned", "data.tasks", compute_fn=tasks_of)
        parser.link_arguments(("pool.pretrained", "pool.tokenizer"), "data.tokenizer", compute_fn=tokenizer_path)
        add_options(parser, TEST_OPTIONS)
        if self.extra_arguments is not None:
            self.extra_arguments(parser)


def parse_config(parser: LightningArgumentParser, args, what: str = "The command line"):
    """``parser.parse_args(args)``; a parser built with ``exit_on_error=False`` (a sweep's) raises its
    error as a one-line ``MergelitError`` (its close-key hint kept) naming ``what`` was parsed."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(args)
    except ArgumentError as error:
        raise MergelitError(f"{what} is not a valid config: {error}") from None


def test_command(args: Optional[list[str]] = None):
    """``mergelit test ARGS``: parse and instantiate, then run the test flow; returns the report."""
    cli = MergeCLI(args)
    config = cli.config
    export_to = config.get("merged_model_save_path")
    return run_test(
        cli.trainer, cli.model, cli.datamodule, report_save_path=config.get("report_save_path"),
        merged_model_save_path=export_to, verbose=config.get("verbose", False),
        save_predictions=config.get("save_predictions", False), fused_gelu=config.get("fused_gelu", False),
        extra_metrics=config.get("extra_metrics", True),
        config_yaml=reproducible_config(yaml.safe_load(cli.parser.dump(config, skip_none=False))) if export_to else None,
        wandb_artifact=bool(config.get("export.wandb_artifact") or False),
    )


def adapt_command(args: Optional[list[str]] = None) -> None:
    """``mergelit fit`` with a merge config (a ``pool:`` group): run only ``method.prepare`` (AdaMerging's
    ``trainer.fit``; Fisher/RegMean's statistics) and keep its result for later ``mergelit test`` runs."""
    cli = MergeCLI(args)
    method = cli.model
    if type(method).prepare is MergeMethod.prepare:
        raise ValueError(
            f"{type(method).__name__} has nothing to fit: it merges from the weights alone. Run `mergelit test` instead."
        )
    if getattr(method, "coefficients_path", "unset") is None:
        # AdaMerging without a file named: keep the learned coefficients in the run's log folder.
        method.coefficients_path = os.path.join(cli.trainer.log_dir or ".", "adamerging_coefficients.json")
    method.prepare(cli.trainer, cli.datamodule)
    if getattr(method, "coefficients_path", None):
        print(f"Coefficients: {method.coefficients_path} (reuse with --model.init_args.coefficients_path)")


if __name__ == "__main__":
    import sys

    # `python -m mergelit.cli test ...` was the entry point before the command moved to mergelit/__main__.py.
    sys.exit("`python -m mergelit.cli` is now `python -m mergelit` (the same arguments: `python -m mergelit test -c ...`).")
