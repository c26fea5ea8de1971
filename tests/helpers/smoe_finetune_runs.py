"""Launching smoe_ds.finetune on a model pretrained here, and checking its export against the
engine: what the transfer tests (tests/finetuning/test_finetune_smoe_export.py) and the paper experiment's
learned/THOR fine-tunes (tests/experiments/test_paper_experiment.py) share."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import smoe_ds  # noqa: F401  (registers smoe_lm with the Auto classes)
from tests.helpers.corpora import SENTIMENT
from tests.helpers.launch import REPO, run_ranks

TOL = 1e-5
CONFIG = str(REPO / "ds_configs" / "finetune_minilm_sst2.json")  # max_length 64, ep_size 2, ZeRO-2
FIT = ["moe.num_experts=4", "moe.k_schedule.k_min=2", "moe.k_schedule.k_max=4"]  # the tiny pretrained models' N


def finetune(out: Path, model: Path, *settings: str, ranks: int = 2, launcher: str = "deepspeed", check: bool = True):
    """Fine-tune ``model`` (an export or a checkpoint folder) on the sentiment fixture into ``out``."""
    sets = [f"hf.model={model}", f"data.path={SENTIMENT / 'train.tsv'}", f"data.validation={SENTIMENT / 'dev.tsv'}"]
    sets += [*FIT, "train_micro_batch_size_per_gpu=8", "scheduler.params.warmup_num_steps=2", f"run.out_dir={out}"]
    sets.append("run.save_checkpoint=false")  # no test here reads the fine-tune's own checkpoint
    args = [a for s in (*sets, *settings) for a in ("--set", s)]
    target = ["smoe_ds.finetune", "--config", CONFIG, *args]
    return run_ranks(launcher, ranks, target, module=True, timeout=420, check=check)


def export_losses_on_dev(model_dir: Path, ks: list[int]) -> dict[int, tuple[float, float]]:
    """The exported classifier, loaded single-process with the Auto class: (loss, accuracy) on the
    dev fixture at each k."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(SENTIMENT / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    batch = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    found = {}
    for k in ks:
        model.set_active_experts(k)
        with torch.no_grad():
            logits = model(**batch).logits.float()
        found[k] = (F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item())
    return found


def engine_rows(out: Path) -> dict[int, dict]:
    """The fine-tune's own evaluation at the end, by k."""
    return {r["k"]: r for r in json.loads((out / "train_summary.json").read_text())["self_slimming"]}
