"""The ``math_word_problem`` fine-tuning task: a pretrained encoder, converted to SMoE-Dropout (or
not, the dense baseline), with the equation decoder of ``smoe_ds.finetuning.mwp_model``.

Data: ``data.path`` and ``data.validation``, CSV files in the SVAMP authors' format, read and
checked by ``smoe_ds.finetuning.mwp_data`` (a bad row stops the run with one line naming file and row).
The decoder's vocabulary is the training equations' operators and constants; a validation
problem whose equation uses another constant can still be solved by an equivalent equation.
Metrics, at every k: value accuracy (the predicted equation's value within 1e-4 of the gold
equation's) and equation accuracy (the same tokens). The final evaluation's predictions go to
``predictions.json``; the export is the encoder as a Hugging Face directory plus the decoder
(``smoe_ds.finetuning.mwp_model.load_solver`` reads it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from smoe_ds.distributed import faults
from smoe_ds.distributed import process_group as D
from smoe_ds.finetuning.config import FinetuneConfig
from smoe_ds.finetuning.labelled_data import eval_shards
from smoe_ds.finetuning.mwp_data import answer_report, is_correct, read_problems
from smoe_ds.finetuning.mwp_model import (
    EquationVocab,
    MathWordProblemModel,
    equation_targets,
    question_inputs,
    save_solver,
)
from smoe_ds.finetuning.tasks import Task
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.training import preflight


class MathWordProblemTask(Task):
    metric, metric_label = "value_accuracy", "validation value accuracy"

    def __init__(self, cfg: FinetuneConfig, world_size: int, micro_batch: int) -> None:
        super().__init__(cfg, world_size, micro_batch)
        d = cfg.data
        self.train, self.validation = preflight.on_every_rank(
            lambda: (read_problems(d.path), read_problems(d.validation))
        )
        if d.max_train_examples:
            self.train = self.train[: d.max_train_examples]
        if d.max_eval_examples:
            self.validation = self.validation[: d.max_eval_examples]
        self.vocab = EquationVocab.from_problems(self.train)
        self.max_slots = max(len(p.numbers) for p in self.train + self.validation)
        # the decoding budget: the longest training equation, and a little room
        self.max_tokens = max(len(p.equation) for p in self.train) + 2
        self.label_names = None
        checks = answer_report(self.train)
        unwritable = sum(self.vocab.encode(p.equation) is None for p in self.validation)
        self.description = (
            f"{len(self.train)} training problems ({d.path}), {len(self.validation)} validation ({d.validation}); "
            f"{len(self.vocab.constants)} constants; training rows whose Answer is rounded / differs from "
            f"their equation: {checks['rounded']} / {checks['differs']} (scored against the equation); "
            f"validation equations with a constant unseen in training: {unwritable}"
        )
        self.predictions: dict[int, list[dict]] = {}

    def load_model(self, path: str) -> MathWordProblemModel:
        from transformers import AutoModel

        return MathWordProblemModel(AutoModel.from_pretrained(path), self.vocab)

    def load_smoe_export(self, path: str, ep_size: int, ep_rank: int, for_deepspeed: bool) -> MathWordProblemModel:
        """An encoder pretrained by smoe_ds.train (its export as ``SMoEModel``, this rank's experts), a new decoder."""
        from smoe_ds.models.transformers_lm import SMoEModel

        return MathWordProblemModel(SMoEModel.from_export_sharded(path, ep_size, ep_rank, for_deepspeed), self.vocab)

    def hf_part(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.encoder

    def new_weights(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return list(model.decoder.parameters())

    def settings(self) -> dict:
        return {"max_slots": self.max_slots, "max_length": self.cfg.hf.max_length, "max_tokens": self.max_tokens}

    def save_extra(self, model: torch.nn.Module, out: Path) -> None:
        save_solver(model, self.settings(), out)

    def batch(self, problems: list, with_targets: bool = True) -> dict:
        """Model inputs for ``problems``: the tokenised questions, slot positions and (for training) targets."""
        out = question_inputs(self.tokenizer, [p.question for p in problems], self.max_slots, self.cfg.hf.max_length)
        if with_targets:
            out["targets"] = equation_targets(self.vocab, problems)
        return out

    def train_batches(self, rank: int, grad_accum: int, start_step: int, skipped: int = 0) -> Iterator[dict]:
        for idx in self.train_order(rank, grad_accum, start_step, skipped):
            yield self.batch([self.train[i] for i in idx.tolist()])

    @torch.no_grad()
    def evaluate(self, engine, k: int, rank: int) -> dict:
        """{"k", "value_accuracy", "equation_accuracy", "examples_per_s"} over the whole validation set."""
        engine.eval()
        set_active_experts(engine.module, k)
        start = time.perf_counter()
        mine = []
        for idx, counts in eval_shards(len(self.validation), self.micro_batch, rank, self.world_size):
            faults.maybe_die("eval", rank)
            problems = [self.validation[i] for i in idx.tolist()]
            inputs = {key: t.to(engine.device) for key, t in self.batch(problems, with_targets=False).items()}
            solved = engine.module.solve(**inputs, max_tokens=self.max_tokens)
            for p, equation, count in zip(problems, solved, counts.tolist()):
                if count:  # padding repeats an example unscored
                    row = {"source": p.source, "predicted": equation, "gold": list(p.equation)}
                    mine.append({**row, "correct": is_correct(equation, p)})
        rows = [r for ranks in D.all_gather_object(mine) for r in ranks]
        engine.train()
        n = len(rows)
        self.predictions[k] = sorted(rows, key=lambda r: _row_number(r["source"]))
        return {
            "k": k,
            "value_accuracy": sum(r["correct"] for r in rows) / n,
            "equation_accuracy": sum(r["predicted"] == r["gold"] for r in rows) / n,
            "examples_per_s": n / (time.perf_counter() - start),
        }

    def write_predictions(self, out_dir: Path) -> None:
        path = out_dir / "predictions.json"
        path.write_text(json.dumps({str(k): rows for k, rows in self.predictions.items()}, indent=1) + "\n")


def _row_number(source: str) -> int:
    return int(source.rsplit(":", 1)[1])
