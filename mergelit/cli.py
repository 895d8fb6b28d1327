"""``MergeCLI``: the LightningCLI parser and instantiation of ``mergelit test`` (and of each sweep point).

    mergelit test -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml

Config groups: ``pool:`` (ModelPool), ``model:`` (a MergeMethod subclass, ``class_path`` +
``init_args``), ``data:`` (GLUEDataModule), ``trainer:``. The pool is linked into the
method, and the pool's tasks and tokenizer into the data, so every part uses one task order.

``MergeCLI`` only parses and instantiates (LightningCLI's ``run=False``); ``test_command``
then runs the flow of one ``mergelit test`` top to bottom (``mergelit.run.run_test``). A sweep
holds a ``MergeCLI`` that only parses (``instantiate=False``) and makes each point's objects
itself (``mergelit.sweep``).

A misspelt key or option gets the closest known ones in its error (``Did you mean
'data.batch_size'?``): ``MergeCLI``'s parser is a ``HintingArgumentParser``.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mergelit.errors import MergelitError
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


def _yaml_file(value: str):
    import os

    from mergelit.configfile import load_yaml

    if not os.path.isfile(value):
        return None
    return load_yaml(value)  # named errors; a key (a task) given twice in a mapping is refused


def fusionbench_args(args):
    """Command-line arguments with FusionBench pool files turned into mergelit's ``pool:`` group.

    ``--pool FILE`` whose content is a FusionBench pool (``models: [{name: _pretrained_, path: gpt2},
    ...]``), and ``-c FILE`` holding such a pool under ``pool:``, become the same values in mergelit's
    form (``pool.fusionbench_pool_args``), given as the YAML strings jsonargparse accepts in place of
    a file. Everything else passes unchanged (dicts and Namespaces too).
    """
    import json

    if not isinstance(args, (list, tuple)):
        return args
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--pool", "-c", "--config") and (eq or i + 1 < len(args)):
            value = value if eq else args[i + 1]
            content = _yaml_file(value)
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
    try:
        known = set(parser.get_defaults().keys())  # every dotted config key the parser knows
    except Exception:  # a parser whose defaults cannot be built: no suggestion
        known = set()
    nested = re.search(r"class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", message, re.S)
    if nested:  # a method argument: the candidates are the class's __init__ arguments
        import importlib
        import inspect

        module, _, name = nested[1].rpartition(".")
        try:
            arguments = list(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)
        except (ImportError, AttributeError, ValueError):
            arguments = []
        matches = difflib.get_close_matches(nested[2], [a for a in arguments if a not in ("self", "pool")], n=3, cutoff=0.7)
        if matches:
            return f"\nDid you mean {' or '.join(repr(m) for m in matches)} (an argument of {name})?"
    for pattern, key_of in _UNKNOWN_KEY:
        match = pattern.search(message)
        if match:
            matches = difflib.get_close_matches(key_of(match), sorted(known), n=3, cutoff=0.75)
            if matches:
                return f"\nDid you mean {' or '.join(repr(m) for m in matches)}?"
    return ""


class HintingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors end with the closest known keys to a misspelt one
    (``Did you mean 'data.batch_size'?``); otherwise jsonargparse's behaviour, unchanged."""

    def error(self, message: str, ex: Optional[Exception] = None):
        return super().error(message + close_keys(self, message), ex)


class MergeCLI(LightningCLI):
    """LightningCLI over a ``MergeMethod``, the GLUE DataModule and a ``pool:`` group (parse + instantiate).

    Args:
        args: the command line after ``mergelit test`` (default: ``sys.argv[2:]``), or a dict/Namespace.
        instantiate: make the pool, data, method and trainer from the parsed config (``False``: parse
            only; ``config`` and ``parser`` are then all there is, for a caller that makes the
            objects itself, as a sweep does per point).
        add_arguments: also add these arguments to the parser (``add_arguments(parser)``: a sweep's
            ``sweep:`` group and ``--output_dir``).
    """

    def __init__(
        self,
        args=None,
        instantiate: bool = True,
        add_arguments: Optional[Callable[[LightningArgumentParser], None]] = None,
        **kwargs,
    ):
        method_classes()  # import every method, so that short class names (`--model TiesMerging`) resolve
        args = fusionbench_args(args)  # FusionBench pool files work as the pool
        self.instantiate = instantiate
        self.extra_arguments = add_arguments
        kwargs.setdefault("parser_class", HintingArgumentParser)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a rerun into the same log dir
        super().__init__(
            model_class=MergeMethod,
            subclass_mode_model=True,
            datamodule_class=GLUEDataModule,
            auto_configure_optimizers=False,
            # Methods are configured by the YAML, never restored from Lightning checkpoints.
            load_from_checkpoint_support=False,
            args=args,
            run=False,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # As LightningCLI's, minus its warning about args given while sys.argv has some:
        # the `mergelit` command passes the arguments after `test`, on purpose.
        self.config = parse_config(parser, args)

    def instantiators(self) -> list[tuple]:
        """jsonargparse instantiators for this CLI's classes: a WandbLogger without an API key (and
        no mode chosen) logs offline instead of failing."""
        return [(wandb_logger, wandb_logger_class(), True)]

    def instantiate_classes(self) -> None:
        # As LightningCLI's, through jsonargparse's `instantiate` with this CLI's instantiators.
        if not self.instantiate:
            return
        self.config_init = self.parser.instantiate(self.config, instantiators=self.instantiators())
        self.datamodule = self.config_init.get("data")
        self.model = self.config_init.get("model")
        self.trainer = self.instantiate_trainer()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(ModelPool, "pool")
        parser.link_arguments("pool", "model.init_args.pool", apply_on="instantiate")
        parser.link_arguments("pool.finetuned", "data.tasks", compute_fn=tasks_of)
        parser.link_arguments(("pool.pretrained", "pool.tokenizer"), "data.tokenizer", compute_fn=tokenizer_path)
        parser.add_argument(
            "--export.wandb_artifact",
            type=bool,
            default=False,
            help="Also log the exported model folder (--merged_model_save_path) as a W&B artifact, to each W&B "
            "logger of the run (offline without an API key).",
        )
        parser.add_argument(
            "--report_save_path",
            type=Optional[str],
            default=None,
            help="Also write the report JSON here (FusionBench's option name); it is always written "
            "to the run's log dir as report.json.",
        )
        parser.add_argument(
            "--merged_model_save_path",
            type=Optional[str],
            default=None,
            help="Export the merged model: DIR/<task>/ is a complete GPT2ForSequenceClassification "
            "checkpoint (merged body + that task's head, config, tokenizer, safetensors).",
        )
        parser.add_argument(
            "--save_predictions",
            type=bool,
            default=False,
            help="Also write per-example predictions (idx, label, predicted class, logits), one JSON-lines "
            "file per task, to predictions/<task>.jsonl next to the report (log dir and --report_save_path).",
        )
        parser.add_argument(
            "--verbose",
            type=bool,
            default=False,
            help="Also print Lightning's own results table (every metric once per task loader).",
        )
        parser.add_argument(
            "--extra_metrics",
            type=bool,
            default=True,
            help="The printed table's column of CoLA MCC and MRPC/QQP F1 (the report always holds them).",
        )
        parser.add_argument(
            "--fused_gelu",
            type=bool,
            default=False,
            help="Score with torch's fused tanh GELU instead of transformers' Python formula: faster on CPU; "
            "logits change in the last bits (benchmarks/gelu.py measures it), so it is off by default.",
        )
        if self.extra_arguments is not None:
            self.extra_arguments(parser)


def parse_config(parser: LightningArgumentParser, args, what: str = "The command line"):
    """``parser.parse_args(args)``; a parser built with ``exit_on_error=False`` (a sweep's) raises its
    error as a ``MergelitError`` (one line, its close-key hint kept) naming ``what`` was parsed."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(args)
    except ArgumentError as error:
        raise MergelitError(f"{what} is not a valid config: {error}") from None


def test_command(args: Optional[list[str]] = None):
    """``mergelit test ARGS``: parse and instantiate, then run the test flow; returns the report."""
    import yaml

    from mergelit.export import reproducible_config

    cli = MergeCLI(args)
    config = cli.config
    export_to = config.get("merged_model_save_path")
    return run_test(
        cli.trainer,
        cli.model,
        cli.datamodule,
        report_save_path=config.get("report_save_path"),
        merged_model_save_path=export_to,
        verbose=config.get("verbose", False),
        save_predictions=config.get("save_predictions", False),
        fused_gelu=config.get("fused_gelu", False),
        extra_metrics=config.get("extra_metrics", True),
        config_yaml=reproducible_config(yaml.safe_load(cli.parser.dump(config, skip_none=False))) if export_to else None,
        wandb_artifact=bool(config.get("export.wandb_artifact") or False),
    )


def adapt_command(args: Optional[list[str]] = None) -> None:
    """``mergelit fit`` with a merge config (one with a ``pool:`` group): run only the method's data-driven
    step, ``method.prepare`` (AdaMerging's ``trainer.fit``; Fisher/RegMean's statistics), and keep its
    result for later ``mergelit test`` runs (AdaMerging's coefficients file; the statistics cache)."""
    import os

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
