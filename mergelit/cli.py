"""The ``mergelit`` command: a LightningCLI over merge methods, the GLUE DataModule and a pool.

    mergelit test -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml

Config groups: ``pool:`` (ModelPool), ``model:`` (a MergeMethod subclass, ``class_path`` +
``init_args``), ``data:`` (GLUEDataModule), ``trainer:``. The pool is linked into the
method, and the pool's tasks and tokenizer into the data, so every part uses one task order.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from mergelit.glue import GLUEDataModule, ordered_tasks
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.report import format_report, write_report

TRAINER_DEFAULTS = {
    # Logs, config.yaml and report.json go to ./lightning_logs/version_N/.
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}},
    # Our loaders shard length-sorted batches by rank themselves; Lightning's
    # DistributedSampler would pad the last shard with repeated examples.
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
}


def _tasks_of(finetuned: dict) -> list[str]:
    return ordered_tasks(list(finetuned or {}))


def _tokenizer_of(pretrained: str, tokenizer: Optional[str]) -> str:
    return tokenizer or pretrained


class MergeCLI(LightningCLI):
    """LightningCLI with a ``pool:`` group, linked into ``model`` and ``data``."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        super().__init__(
            model_class=MergeMethod,
            subclass_mode_model=True,
            datamodule_class=GLUEDataModule,
            # A rerun into the same log dir must not abort on an existing config.yaml.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            # Lightning's own results table repeats every metric once per task loader;
            # after_test prints one compact table instead (`--verbose true` brings it back).
            parser.set_defaults(verbose=False)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(ModelPool, "pool")
        parser.link_arguments("pool", "model.init_args.pool", apply_on="instantiate")
        parser.link_arguments("pool.finetuned", "data.tasks", compute_fn=_tasks_of)
        parser.link_arguments(("pool.pretrained", "pool.tokenizer"), "data.tokenizer", compute_fn=_tokenizer_of)
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

    def before_test(self) -> None:
        # Statistics (Fisher, RegMean) need trainer.predict, which cannot run inside trainer.test:
        # run it first on the same Trainer (every DDP process runs this hook in the same order).
        self.model.prepare(self.trainer, self.datamodule)

    def after_test(self) -> None:
        self._finish(self.config[self.subcommand])

    @rank_zero_only
    def _finish(self, config) -> None:
        report = self.model.report
        print(f"\n{type(self.model).__name__} on {len(self.model.tasks)} GLUE tasks\n{format_report(report)}\n")
        if self.model.report_path:
            print(f"Report: {self.model.report_path}")
        if config.get("report_save_path"):
            print(f"Report: {write_report(report, config.report_save_path)}")
        if config.get("merged_model_save_path"):
            folders = self.model.save_merged(config.merged_model_save_path)
            print(f"Merged model exported to {config.merged_model_save_path} ({len(folders)} task checkpoints)")


USAGE = """mergelit: model merging for GPT-2 GLUE classifiers.

commands:
  mergelit test -c RUN.yaml -c METHOD.yaml     merge the pool with one method and score it
  mergelit sweep -c ... -c SWEEP.yaml          a grid of test runs in one process: reports, table, plot
  mergelit compare RUNS... | -c ...            the comparison table across methods
  mergelit fit -c FINETUNE.yaml                fine-tune one GPT-2 classifier on a GLUE task
  mergelit demo                                offline demo: build a small pool, merge, print the table

`mergelit COMMAND --help` lists each command's options.
"""


def main(args: Optional[list[str]] = None) -> None:
    from mergelit.tracking import default_wandb_mode

    default_wandb_mode()  # a WandbLogger without an API key logs offline instead of failing
    argv = sys.argv[1:] if args is None else list(args)
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    if argv[:1] in (["sweep"], ["compare"]):
        # Grids of test runs in one process: not Trainer methods, so not LightningCLI subcommands
        # (see mergelit/sweep.py).
        from mergelit.sweep import main as sweep_main

        return sweep_main(argv)
    if argv[:1] == ["fit"]:
        # Fine-tuning is its own LightningCLI (another model and datamodule): mergelit/finetune.py.
        from mergelit.finetune import FineTuneCLI

        FineTuneCLI(args=args)  # args None: LightningCLI reads sys.argv itself, `fit` included
        return
    if argv[:1] == ["demo"]:
        from mergelit.demo import main as demo_main

        return demo_main(argv[1:])
    MergeCLI(args=args)


if __name__ == "__main__":
    main()
