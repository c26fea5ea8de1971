"""The config of ``python -m smoe_ds.finetune``: a pretrained Hugging Face model fine-tuned with
SMoE-Dropout (or densely, as the baseline) under DeepSpeed.

Like the trainer's config it is one DeepSpeed JSON file with sections of ours, loaded strictly
(an unknown key is an error naming it) and overridable with ``--set``:

- ``hf``: which pretrained model, which task, and how the experts are weighted;
- ``moe``: the trainer's section; ``mode`` is ``smoe_dropout`` (default), ``random_fixed`` or
  ``dense`` (plain fine-tuning, the baseline) for a Hugging Face model. N must divide the FFN's
  hidden size, and each expert's width is that size / N. The keys a fine-tune does not read
  (``UNUSED_KEYS``: ``moe.d_expert`` among them) are refused, not ignored. A
  model pretrained by ``smoe_ds.train`` is fine-tuned in the mode it was pretrained in, any of
  the trainer's (``learned`` and ``thor`` too);
- ``data``: the labelled files (classification) or the text (causal LM); ``data.path`` and
  ``data.text_column`` are the trainer's keys with the trainer's meaning (``data.train``, the old
  name of ``data.path``, still works with a one-line warning);
- ``run``: the trainer's section (steps, evaluation, out_dir, ...).

It is a ``TrainConfig`` with other sections, so the trainer's checks of the moe, run and
DeepSpeed sections (ep_size, k schedule, batch sizes, ZeRO with MoE) apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from smoe_ds.config.renamed import warn_renamed
from smoe_ds.config.schema import ConfigError, DataConfig, TrainConfig, _require
from smoe_ds.hf.surgery import HF_WEIGHTINGS

TASKS = ("classification", "causal_lm", "math_word_problem")
# The modes a Hugging Face model converts to. THOR and the learned router are trained from scratch in
# the paper: a pretrained dense FFN has no counterpart of them, but a model smoe_ds.train pretrained
# with them does (smoe_ds.finetuning.from_smoe_export).
HF_CONVERSION_MODES = ("smoe_dropout", "random_fixed", "dense")


@dataclass
class HFSection:
    model: str | None = None  # a local model directory or a hub name (required)
    task: str = "classification"  # "classification", "causal_lm" or "math_word_problem"
    weighting: str = "rescale"  # "rescale" (function-preserving at k = N) or "softmax" (the paper's)
    # tokens per example, longer ones truncated (classification, math word problems); causal LM: the block size
    max_length: int = 128
    # learning rate of the weights the pretrained model lacks (math word problems' decoder), null = the optimizer's
    new_weights_lr: float | None = None


@dataclass
class TaskDataConfig:
    # The training data, data.path as in the trainer. classification: a local .csv/.tsv/.json/.jsonl
    # file, or a hub dataset name (e.g. "glue" with hub_config "sst2"). causal_lm: a text file or
    # folder, or a hub dataset with a text column.
    path: str | None = None
    validation: str | None = None  # a local file; default: the hub's validation split, else val_fraction of path
    hub_config: str | None = None  # the hub dataset's config name (e.g. "sst2" of "glue")
    text_column: str | None = None  # null: by hf.task, "text" for causal_lm (as the trainer), else "sentence" (GLUE's)
    text_pair_column: str | None = None  # for sentence-pair tasks (e.g. GLUE's MRPC: sentence1, sentence2)
    label_column: str = "label"  # classification: the column of each example's label
    val_fraction: float = 0.05  # held out of data.path when there is no validation split
    max_train_examples: int | None = None  # None: all
    max_eval_examples: int | None = None  # None: all
    seed: int = 0  # example order and the held-out split
    # The old name of path, kept so that existing configs load: resolve() moves it there with a warning.
    train: str | None = None


@dataclass
class FinetuneConfig(TrainConfig):
    SECTIONS: ClassVar[tuple[str, ...]] = ("hf", "moe", "data", "run")
    COMMAND: ClassVar[str] = "smoe-finetune"
    UNUSED_KEYS: ClassVar[dict[str, str]] = {
        "moe.d_expert": "an expert's width is the pretrained FFN's hidden size / moe.num_experts",
        "moe.router_init_std": "the routers are drawn by the conversion (smoe_ds.hf.surgery) or come with the export",
        "moe.capacity_factor": "a fine-tune routes every token (dropless)",
        "moe.full_route_dispatch": "a fine-tune's experts use the default all_to_all for full routes",
        "run.eval_batches": "evaluations use the whole validation set, or run.final_eval_batches for causal_lm",
    }

    hf: HFSection = field(default_factory=HFSection)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)

    def resolve(self) -> "FinetuneConfig":
        """The trainer's resolve, after the old spelling ``data.train`` is moved into ``data.path``
        and a null ``data.text_column`` is given its task's default."""
        data = self.data
        if data.train is not None:
            _require(data.path is None, "data.train is the old name of data.path: set only data.path")
            warn_renamed("data.train", "data.path")
            data.path, data.train = data.train, None
        if data.text_column is None:
            # Causal LM reads text as the trainer does (hub text datasets call the column "text");
            # labelled tasks read GLUE's column.
            data.text_column = "text" if self.hf.task == "causal_lm" else "sentence"
        return super().resolve()

    def to_dict(self) -> dict:
        """The trainer's, without ``data.train``: resolve() always moved it into data.path."""
        out = super().to_dict()
        del out["data"]["train"]
        return out

    def validate(self) -> None:
        hf, data = self.hf, self.data
        _require(bool(hf.model), "set hf.model to a local model directory or a hub name")
        _require(hf.task in TASKS, f"hf.task must be one of {', '.join(TASKS)}, got {hf.task!r}")
        _require(
            hf.weighting in HF_WEIGHTINGS,
            f"hf.weighting must be one of {', '.join(HF_WEIGHTINGS)}, got {hf.weighting!r}",
        )
        _require(hf.max_length >= 2, f"hf.max_length must be >= 2, got {hf.max_length}")
        _require(bool(data.path), "set data.path to a labelled file, a text file or folder, or a hub dataset")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(data, key)
            _require(value is None or value >= 1, f"data.{key} must be >= 1 or null, got {value}")
        lr = hf.new_weights_lr
        _require(lr is None or lr > 0, f"hf.new_weights_lr must be > 0 or null, got {lr}")
        if hf.task == "math_word_problem":
            _require(bool(data.validation), "math_word_problem needs data.validation, a CSV file like data.path")
        if hf.task == "causal_lm" and data.validation is not None:
            raise ConfigError(
                "data.validation is for classification; causal_lm holds out data.val_fraction of data.path"
            )
        super().validate()

    def check_mode_for_hf_model(self) -> None:
        """ConfigError unless moe.mode is one a Hugging Face model converts to (``HF_CONVERSION_MODES``)."""
        _require(
            self.moe.mode in HF_CONVERSION_MODES,
            f"moe.mode {self.moe.mode!r} is not available for fine-tuning a Hugging Face model; choose one of "
            f"{', '.join(HF_CONVERSION_MODES)} (learned and thor fine-tune models pretrained by smoe_ds.train)",
        )

    def corpus_config(self) -> DataConfig:
        """The trainer's data section for causal LM: ``data.path`` tokenised by the model's tokenizer."""
        d = self.data
        return DataConfig(
            path=d.path,
            hub_config=d.hub_config,
            text_column=d.text_column,
            val_fraction=d.val_fraction,
            tokenizer=self.hf.model,
            seed=d.seed,
        )
