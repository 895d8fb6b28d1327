"""Fine-tuning: make one pool member, a ``GPT2ForSequenceClassification`` for one GLUE task.

    mergelit fit -c configs/finetune/gpt2_glue.yaml --data.task sst2 --export.dirpath checkpoints/gpt2_sst2

Same tokenization and collation as evaluation; the published pool's recipe (lr 5e-5, 3 epochs,
AdamW, linear decay to 0); the export goes straight into a ``pool:``. See docs/data.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from mergelit.glue import GLUEDataModule
from mergelit.pool import check_checkpoint_folder, tokenizer_path
from mergelit.tasks import GLUE_TASKS, PAD_TOKEN_ID, ordered_tasks


def adamw_linear_schedule(module: L.LightningModule, learning_rate: float, weight_decay: float,
                          warmup_steps: int) -> dict:
    """AdamW, warm-up over ``warmup_steps`` then a linear decay to 0 at the last step (HF Trainer's default)."""
    from transformers import get_linear_schedule_with_warmup
    # Fused: on CPU the per-tensor loop over the 50,257-row embedding costs as much as a small model's step.
    fused = module.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=weight_decay, fused=fused)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup_steps, total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class GLUETaskDataModule(GLUEDataModule):
    """One GLUE task for fine-tuning: its train split (shuffled) and its evaluation split.

    Args:
        task: the GLUE task (``cola``, ``mnli``, ``mrpc``, ``qnli``, ``qqp``, ``rte``, ``sst2``).
        tokenizer: tokenizer path or hub id; linked from ``model.tokenizer`` (or ``model.pretrained``).
        path: hub dataset name (``glue``) or a local folder with one ``save_to_disk`` DatasetDict per task.
        batch_size: training batch size (per process).
        eval_batch_size: validation batch size.
        num_workers: DataLoader worker processes.
        max_length: truncation length in tokens (``longest_first``), as in evaluation.
        shuffle_seed: seed of the training order (epoch e: ``shuffle_seed + e``, so a resumed run replays it).
        cache_dir: where tokenized splits are cached (shared with evaluation).
    """

    def __init__(self, task: str, tokenizer: str = "gpt2", path: str = "glue", batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, max_length: int = 512, shuffle_seed: int = 0,
                 cache_dir: str = "lightning_logs/cache/tokenized"):
        super().__init__(tasks=ordered_tasks([task]), tokenizer=tokenizer, path=path, batch_size=eval_batch_size,
                         num_workers=num_workers, max_length=max_length, cache_dir=cache_dir)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.task = task
        self.train_batch_size = batch_size
        self.shuffle_seed = shuffle_seed

    @property
    def label_names(self) -> list[str]:
        """The dataset's label names in label-id order (the ``ClassLabel`` feature)."""
        feature = self.raw(self.task, GLUE_TASKS[self.task].train_split).features["label"]
        names = getattr(feature, "names", None)
        return list(names) if names else list(GLUE_TASKS[self.task].label_names)

    def prepare_data(self) -> None:
        self.check(("train", "eval"))
        self.train_dataset(self.task)
        self.eval_dataset(self.task)

    def setup(self, stage: str | None = None) -> None:
        self.check(("train", "eval"))

    def train_dataloader(self) -> DataLoader:
        num_replicas, rank = self._world()
        dataset = self.train_dataset(self.task)
        # DistributedSampler also for one process: its order depends only on (seed, epoch) and
        # Lightning calls set_epoch on it, so resuming from a checkpoint replays the same order.
        sampler = DistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=self.shuffle_seed)
        return DataLoader(dataset, batch_size=self.train_batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.task)


def load_classifier(pretrained: str, num_labels: int, label_names: Optional[list[str]] = None):
    """``GPT2ForSequenceClassification`` with the body of ``pretrained`` (a ``GPT2LMHeadModel``, bare
    ``GPT2Model`` or classifier: its head replaced when the label count differs), pad token 50256."""
    from transformers import AutoConfig, GPT2ForSequenceClassification
    check_checkpoint_folder(pretrained)
    names = list(label_names or [f"LABEL_{i}" for i in range(num_labels)])
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} label names {names} for {num_labels} labels.")
    config = AutoConfig.from_pretrained(pretrained)
    if config.model_type != "gpt2":
        raise ValueError(f"{pretrained!r} is a {config.model_type!r} model; mergelit fine-tunes GPT-2.")
    config.num_labels = num_labels
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.pad_token_id = PAD_TOKEN_ID
    # Weights not in the checkpoint (the score head) are initialised from the global seed.
    return GPT2ForSequenceClassification.from_pretrained(pretrained, config=config, use_safetensors=True,
                                                         dtype=torch.float32, ignore_mismatched_sizes=True)


class SequenceClassifier(L.LightningModule):
    """Fine-tune GPT-2 on one GLUE task (``GPT2ForSequenceClassification``, all weights trained).

    Args:
        task: the GLUE task; linked from ``data.task``.
        pretrained: where to start: hub id (``gpt2``) or folder of a ``GPT2LMHeadModel`` /
            ``GPT2Model`` checkpoint (the ``score`` head is freshly initialised).
        tokenizer: tokenizer path or hub id, if not the one in ``pretrained``.
        learning_rate: AdamW peak learning rate (the published pool: 5e-5).
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: linear warm-up steps before the linear decay to 0 at the last step.
    """

    def __init__(self, task: str, pretrained: str = "gpt2", tokenizer: Optional[str] = None,
                 learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        ordered_tasks([task])
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        self.save_hyperparameters()
        self.task = task
        self.num_labels = GLUE_TASKS[task].num_labels
        self.model = None
        # micro (plain accuracy), unlike MulticlassAccuracy's macro default
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_labels)
        self.val_loss = torchmetrics.MeanMetric()

    def configure_model(self) -> None:
        # Not in __init__, so that parsing a config never loads weights; runs before restore and optimizer.
        if self.model is not None:
            return
        try:
            datamodule = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            datamodule = None
        names = getattr(datamodule, "label_names", None)
        # from_pretrained returns the model in eval mode; Lightning keeps module modes as found.
        self.model = load_classifier(self.hparams.pretrained, self.num_labels, names).train()
        pad = getattr(datamodule, "pad_token_id", PAD_TOKEN_ID)
        if pad != self.model.config.pad_token_id:
            raise ValueError(f"The tokenizer pads with id {pad} but the classifier reads out at pad id "
                             f"{self.model.config.pad_token_id}; use GPT-2's tokenizer (pad = <|endoftext|>, 50256).")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits at each row's last non-pad token, [batch, num_labels]."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()
        labels = batch["labels"]
        self.val_accuracy.update(logits.argmax(-1), labels)
        self.val_loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def on_validation_epoch_end(self) -> None:
        # compute() reduces across processes; mean loss over examples, not over batch means.
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log("val/loss", self.val_loss.compute())
        self.val_accuracy.reset()
        self.val_loss.reset()

    def configure_optimizers(self):
        hparams = self.hparams
        return adamw_linear_schedule(self, hparams.learning_rate, hparams.weight_decay, hparams.warmup_steps)


def export_checkpoint(model, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write a transformers model as a checkpoint folder: config, safetensors, and the tokenizer."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


class ExportPretrained(L.Callback):
    """Export the model as a transformers checkpoint: the last epoch's when training ends, or the
    best epoch's (by ``monitor``) each time validation improves on it.

    Args:
        dirpath: the folder to write (config, safetensors, tokenizer), ready for
            ``pool.finetuned.<task>: DIR``. Default: ``<log_dir>/hf_model``.
        save: ``last``: the final epoch (the recipe: the validation split is also the merge benchmark);
            ``best``: the epoch with the best ``monitor``.
        monitor: the logged validation metric that decides ``best``.
        mode: ``max`` or ``min``: whether a larger ``monitor`` is better.
    """

    def __init__(self, dirpath: Optional[str] = None, save: Literal["best", "last"] = "last",
                 monitor: str = "val/accuracy", mode: Literal["max", "min"] = "max"):
        self.dirpath = dirpath
        self.save = save
        self.monitor = monitor
        self.mode = mode
        self.best_score: Optional[float] = None
        self.best_epoch: Optional[int] = None

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model"))

    def on_validation_end(self, trainer: L.Trainer, pl_module: SequenceClassifier) -> None:
        if trainer.sanity_checking or self.save != "best":
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"ExportPretrained monitors {self.monitor!r}, which was not logged; logged: "
                           f"{', '.join(sorted(trainer.callback_metrics))}.")
        score = float(trainer.callback_metrics[self.monitor])
        best = self.best_score
        if best is None or (self.mode == "max" and score > best) or (self.mode == "min" and score < best):
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self._export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: SequenceClassifier) -> None:
        if self.save == "last":
            self._export(trainer, pl_module)
            rank_zero_info(f"Exported the last epoch to {self.folder(trainer)}")
        elif self.best_score is not None:
            rank_zero_info(f"Exported the best {self.monitor} ({self.best_score:.4f}, epoch {self.best_epoch}) to "
                           f"{self.folder(trainer)}")

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: SequenceClassifier) -> None:
        export_checkpoint(pl_module.model, self.folder(trainer), getattr(trainer.datamodule, "tokenizer", None))

    def state_dict(self) -> dict:
        # Saved in Lightning checkpoints, so that a resumed run keeps comparing to the true best.
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")


FIT_TRAINER_DEFAULTS = {
    "max_epochs": 3,
    # Logs, config.yaml and the Lightning checkpoint (for --ckpt_path) go to ./lightning_logs/version_N/.
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}},
    # The loaders shard by rank themselves; Lightning's wrapper would pad validation with repeated rows.
    "use_distributed_sampler": False,
}


class FineTuneCLI(LightningCLI):
    """``mergelit fit``: LightningCLI over ``SequenceClassifier`` and ``GLUETaskDataModule``."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        from mergelit.cli import HintingArgumentParser  # close-key hints, as `mergelit test`
        kwargs.setdefault("trainer_defaults", FIT_TRAINER_DEFAULTS)
        kwargs.setdefault("parser_class", HintingArgumentParser)
        # SequenceClassifier builds its own AdamW + linear schedule (the recipe, not a CLI choice).
        super().__init__(model_class=SequenceClassifier, datamodule_class=GLUETaskDataModule,
                         save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, run=run,
                         **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ExportPretrained, "export")
        # One task argument (data.task) and one model path decide the labels and the tokenizer.
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments(("model.pretrained", "model.tokenizer"), "data.tokenizer", compute_fn=tokenizer_path)


def fit_command(args: Optional[list[str]] = None) -> None:
    """``mergelit fit ARGS``: fine-tune one classifier (``args``: the command line after ``fit``)."""
    FineTuneCLI(args=["fit", *(args or [])])
