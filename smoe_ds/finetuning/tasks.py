"""What differs between the fine-tuning tasks: the model head, the batches, and the metric.

- ``ClassificationTask``: a sequence-classification head on the pretrained model; labelled
  examples (``smoe_ds.finetuning.labelled_data``); accuracy and cross-entropy over the whole validation set.
- ``CausalLMTask``: continued next-token training of a decoder; the text is tokenised by the
  model's tokenizer and packed into blocks of ``hf.max_length`` + 1 tokens by the trainer's own
  data code; validation loss and perplexity.

Both hand out micro-batches as keyword dicts for the model (labels included, so the model
returns its loss), in the trainer's global order (``smoe_ds.data.train_order``): disjoint per
rank, a pure function of (seed, step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe_ds.config.schema import ConfigError
from smoe_ds.data import eval_batches, load_corpus, train_order
from smoe_ds.distributed import faults
from smoe_ds.distributed import process_group as D
from smoe_ds.finetuning.config import FinetuneConfig
from smoe_ds.finetuning.labelled_data import collate, eval_shards, load_labelled, tokenize
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.training import preflight


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"hf.model {path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token is None:  # GPT-2 and LLaMA tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Task:
    """What both tasks share: the config, the tokenizer, and the trainer's global order over ``self.train``."""

    def __init__(self, cfg: FinetuneConfig, world_size: int, micro_batch: int) -> None:
        self.cfg, self.world_size, self.micro_batch = cfg, world_size, micro_batch
        self.tokenizer = load_tokenizer(cfg.hf.model)

    def train_order(self, rank: int, grad_accum: int, start_step: int, skipped: int = 0) -> Iterator[torch.Tensor]:
        """This rank's micro-batches of training item indices [B] from optimizer step ``start_step``
        on, after ``skipped`` more (those a resumed run skipped for NaN/inf losses before it was
        saved); see ``smoe_ds.data.train_order``."""
        n, seed = len(self.train), self.cfg.data.seed
        return train_order(n, self.micro_batch, rank, self.world_size, seed, grad_accum, start_step, skipped)

    def load_model(self, path: str) -> torch.nn.Module:
        """The pretrained model with the task's head (not yet converted)."""
        model = self.model_class().from_pretrained(path, **self.model_kwargs())
        if self.tokenizer.pad_token_id is not None and model.config.pad_token_id is None:
            # classification heads find the last real token by it
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def load_smoe_export(self, path: str, ep_size: int, ep_rank: int, for_deepspeed: bool) -> torch.nn.Module:
        """This rank's share of a model pretrained by smoe_ds.train, with the task's head
        (``smoe_ds.finetuning.from_smoe_export``)."""
        raise ConfigError(f"hf.task {self.cfg.hf.task} cannot start from a smoe-ds export ({path})")

    def hf_part(self, model: torch.nn.Module) -> torch.nn.Module:
        """The Hugging Face model inside the task's model: what is converted and exported as such."""
        return model

    def new_weights(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Weights the pretrained model lacks, trained at hf.new_weights_lr when it is set."""
        return []

    def save_extra(self, model: torch.nn.Module, out: Path) -> None:
        """Rank 0, after the export of ``hf_part``: whatever else the task's model needs to load."""

    def write_predictions(self, out_dir: Path) -> None:
        """Rank 0, after the final evaluation: the task's per-example outputs, if it keeps any."""


class ClassificationTask(Task):
    metric, metric_label = "accuracy", "validation accuracy"

    def __init__(self, cfg: FinetuneConfig, world_size: int, micro_batch: int) -> None:
        super().__init__(cfg, world_size, micro_batch)

        def load():
            splits = load_labelled(cfg.data)
            return (
                splits,
                tokenize(splits.train, self.tokenizer, cfg.hf.max_length),
                tokenize(splits.validation, self.tokenizer, cfg.hf.max_length),
            )

        splits, self.train, self.validation = preflight.on_every_rank(load)
        self.label_names = splits.label_names
        self.description = splits.description

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_smoe_export(self, path: str, ep_size: int, ep_rank: int, for_deepspeed: bool) -> torch.nn.Module:
        from smoe_ds.models.transformers_lm import SMoEForSequenceClassification

        return SMoEForSequenceClassification.from_export_sharded(
            path, ep_size, ep_rank, for_deepspeed, **self.model_kwargs()
        )

    def model_kwargs(self) -> dict:
        names = self.label_names
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

    def train_batches(self, rank: int, grad_accum: int, start_step: int, skipped: int = 0) -> Iterator[dict]:
        for idx in self.train_order(rank, grad_accum, start_step, skipped):
            yield collate(self.train, idx, self.tokenizer)

    @torch.no_grad()
    def evaluate(self, engine, k: int, rank: int) -> dict:
        """{"k", "accuracy", "loss", "examples_per_s"} over the whole validation set, at k experts."""
        engine.eval()
        set_active_experts(engine.module, k)
        device = engine.device
        start = time.perf_counter()
        total = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, examples
        for idx, counts in eval_shards(len(self.validation), self.micro_batch, rank, self.world_size):
            faults.maybe_die("eval", rank)
            batch = {key: t.to(device) for key, t in collate(self.validation, idx, self.tokenizer).items()}
            labels = batch.pop("labels")
            logits = engine(**batch).logits.float()
            right = (logits.argmax(-1) == labels).double().cpu()
            loss = F.cross_entropy(logits, labels, reduction="none").double().cpu()
            total += torch.stack([(right * counts).sum(), (loss * counts).sum(), counts.sum().double()])
        total = D.all_reduce_sum(total)
        engine.train()
        n = float(total[2])
        return {
            "k": k,
            "accuracy": float(total[0]) / n,
            "loss": float(total[1]) / n,
            "examples_per_s": n / (time.perf_counter() - start),
        }


class CausalLMTask(Task):
    metric, metric_label = "loss", "validation loss (nats/token)"

    def __init__(self, cfg: FinetuneConfig, world_size: int, micro_batch: int) -> None:
        super().__init__(cfg, world_size, micro_batch)
        corpus = preflight.on_every_rank(lambda: load_corpus(cfg.corpus_config(), cfg.hf.max_length))
        self.train, self.validation = corpus.train_blocks, corpus.val_blocks
        self.description = corpus.description
        self.label_names = None
        eval_batches(
            self.validation, micro_batch, 0, world_size, 1
        )  # refuses a split too short now, not after training

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict:
        return {}

    def load_smoe_export(self, path: str, ep_size: int, ep_rank: int, for_deepspeed: bool) -> torch.nn.Module:
        from smoe_ds.models.transformers_lm import SMoEConfig, SMoEForCausalLM

        if SMoEConfig.from_pretrained(path).is_encoder:
            raise ConfigError(
                f"{path} is an encoder (model.objective masked_lm): hf.task causal_lm needs a decoder; "
                "fine-tune an encoder with hf.task classification or math_word_problem"
            )
        return SMoEForCausalLM.from_export_sharded(path, ep_size, ep_rank, for_deepspeed)

    def train_batches(self, rank: int, grad_accum: int, start_step: int, skipped: int = 0) -> Iterator[dict]:
        for idx in self.train_order(rank, grad_accum, start_step, skipped):
            block = self.train[idx]  # [B, T + 1]: the model shifts the labels itself
            yield {"input_ids": block, "labels": block}

    @torch.no_grad()
    def evaluate(self, engine, k: int, rank: int) -> dict:
        """{"k", "loss", "perplexity", "tokens_per_s"} over run.final_eval_batches per rank, at k experts."""
        engine.eval()
        set_active_experts(engine.module, k)
        batches = eval_batches(
            self.validation, self.micro_batch, rank, self.world_size, self.cfg.run.final_eval_batches
        )
        start = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in batches:
            faults.maybe_die("eval", rank)
            block = torch.cat([x, y[:, -1:]], dim=1).to(engine.device)
            total += torch.tensor([engine(input_ids=block, labels=block).loss.item(), 1.0], dtype=torch.float64)
        total = D.all_reduce_sum(total)
        engine.train()
        loss = float(total[0] / total[1])
        tokens = self.world_size * sum(x.numel() for x, _ in batches)
        return {
            "k": k,
            "loss": loss,
            "perplexity": math.exp(loss),
            "tokens_per_s": tokens / (time.perf_counter() - start),
        }


TASK_CLASSES = {"classification": ClassificationTask, "causal_lm": CausalLMTask}
