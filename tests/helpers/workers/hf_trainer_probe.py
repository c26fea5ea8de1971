"""``launch/hf_trainer_example.py`` with one more Trainer callback: when training ends, each rank writes
``OUT/probe_rank{R}.pt``: its frozen weights by name (the routers), the names of those the engine's
optimizer holds, how many of its optimizer groups are DeepSpeed MoE groups, and what the model's own
``save_pretrained`` says when called straight, as a user might, instead of ``trainer.save_model``.

torchrun --nproc_per_node 2 -m tests.helpers.workers.hf_trainer_probe --out OUT [the example's arguments]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from smoe_ds.config import ConfigError
from tests.helpers.launch import REPO
from tests.helpers.workers.router import optimizer_params


def example_module():
    """``launch/hf_trainer_example.py`` imported from its file (``launch/`` is no package)."""
    spec = importlib.util.spec_from_file_location("hf_trainer_example", REPO / "launch" / "hf_trainer_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FrozenWeightsProbe(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        held = optimizer_params(optimizer)  # accelerate's wrapper: .optimizer is DeepSpeed's ZeRO optimizer
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        report = {
            "frozen": frozen,
            "frozen_in_optimizer": [name for name, p in model.named_parameters() if name in frozen and id(p) in held],
            "moe_groups": sum(bool(g.get("moe")) for g in optimizer.optimizer.param_groups),
            "direct_save": direct_save(model, Path(args.output_dir) / f"direct_save_rank{args.process_index}"),
        }
        torch.save(report, Path(args.output_dir) / f"probe_rank{args.process_index}.pt")


def direct_save(model, out: Path) -> str:
    """``model.save_pretrained(out)`` with no gathered weights: its refusal, or "saved"."""
    try:
        model.save_pretrained(out)
    except ConfigError as refusal:
        return str(refusal)
    return "saved"


if __name__ == "__main__":
    example_module().main(sys.argv[1:], callbacks=(FrozenWeightsProbe(),))
