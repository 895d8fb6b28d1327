"""Causal-LM pretraining of a small GPT-2 with GPT-2's real tokenizer on the synthetic GLUE training texts (tokenized
exactly as the classifiers will see them): the demo's offline stand-in for ``gpt2``. Merging only behaves as on real
pools when the fine-tuned models share a pretrained start that already models the text (task vectors are small,
mostly independent edits of it). The softmax runs over the token ids that occur in the corpus (a few thousand of
GPT-2's 50,257): the other rows never occur as targets, so a full softmax would only push them down, at ~20x the cost
on CPU. The saved model is a complete ``GPT2LMHeadModel``."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from mergelit.finetune import adamw_linear_schedule
from mergelit.glue import GLUEDataModule
from mergelit.tasks import PAD_TOKEN_ID, TASKS

EOS_TOKEN_ID = PAD_TOKEN_ID  # <|endoftext|>: GPT-2's bos = eos (and the spec's pad)


class GLUECorpusDataModule(GLUEDataModule):
    """The ``train`` splits of ``tasks`` as one corpus (labels unused), shuffled with ``shuffle_seed``; the other
    arguments are ``GLUEDataModule``'s (``cache_dir`` is shared with fine-tuning and evaluation)."""

    def __init__(
        self, tasks: Sequence[str] = TASKS, tokenizer: str = "gpt2", path: str = "glue", batch_size: int = 32,
        max_length: int = 512, shuffle_seed: int = 0, cache_dir: str = "lightning_logs/cache/tokenized",
    ):
        super().__init__(tasks=list(tasks), tokenizer=tokenizer, path=path, batch_size=batch_size,
                         max_length=max_length, cache_dir=cache_dir)
        self.shuffle_seed = shuffle_seed

    def prepare_data(self) -> None:
        self.check(("train",))
        for task in self.tasks:
            self.train_dataset(task)

    def setup(self, stage: str | None = None) -> None:
        self.check(("train",))

    def token_ids(self) -> Tensor:
        """Sorted ids of every token in the corpus, plus ``<|endoftext|>``."""
        ids = {EOS_TOKEN_ID}
        for task in self.tasks:
            for row in self.train_dataset(task)["input_ids"]:
                ids.update(row)
        return torch.tensor(sorted(ids), dtype=torch.long)

    def train_dataloader(self) -> DataLoader:
        num_replicas, rank = self._world()
        corpus = ConcatDataset([self.train_dataset(task) for task in self.tasks])
        sampler = DistributedSampler(corpus, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.shuffle_seed)
        return DataLoader(corpus, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)


class CausalLM(L.LightningModule):
    """A freshly initialised ``GPT2LMHeadModel`` (``n_layer`` blocks, ``n_embd`` wide, ``n_head`` heads,
    ``n_positions`` long) trained on next-token prediction with AdamW: linear warm-up over ``warmup_steps`` to
    ``learning_rate``, then linear decay to 0."""

    def __init__(
        self, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 512,
        learning_rate: float = 2e-3, weight_decay: float = 0.01, warmup_steps: int = 20,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}).")
        self.save_hyperparameters()
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import GPT2Config, GPT2LMHeadModel

        hp = self.hparams
        # bos/eos set explicitly: transformers 5 warns on small configs. No pad token, as the hub's `gpt2`.
        config = GPT2Config(vocab_size=EOS_TOKEN_ID + 1, n_positions=hp.n_positions, n_embd=hp.n_embd,
                            n_layer=hp.n_layer, n_head=hp.n_head, bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
        self.model = GPT2LMHeadModel(config)  # initialised from the global seed
        # The corpus vocabulary, and a map from token id to its index in it (-1: never occurs).
        vocabulary = self.trainer.datamodule.token_ids()
        index = torch.full((config.vocab_size,), -1, dtype=torch.long)
        index[vocabulary] = torch.arange(len(vocabulary))
        self.register_buffer("vocabulary", vocabulary, persistent=False)
        self.register_buffer("vocabulary_index", index, persistent=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.model.transformer(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        # Position t predicts token t+1, wherever both are real tokens.
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        hidden = hidden[:, :-1][keep]
        targets = self.vocabulary_index[input_ids[:, 1:][keep]]
        # The LM head is tied to wte: logits over the corpus vocabulary only.
        logits = hidden @ self.model.transformer.wte.weight[self.vocabulary].T
        loss = F.cross_entropy(logits.float(), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(input_ids))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps)
