"""Single-device inference on an exported model: no DeepSpeed engine, no process group.

from smoe_ds.inference import load_model, set_active_experts
model = load_model("runs/cpu_tiny/export", device="cuda")   # or "cpu"
set_active_experts(model, 2)                               # any k in [1, N]
logits = model(input_ids).logits

``set_active_experts(model, k)`` (``smoe_ds.moe.layer``'s, re-exported here) chooses k for every
model smoe-ds gives: an export, a converted pretrained model, an engine's module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe_ds.config.schema import ConfigError
from smoe_ds.moe.layer import set_active_experts

__all__ = ["load_model", "load_tokenizer", "set_active_experts"]


def load_model(path: str | Path, device: str | torch.device = "cpu", k: int | None = None):
    """Load an exported directory onto ``device`` in eval mode, optionally at ``k`` active experts."""
    from transformers import AutoModelForCausalLM

    import smoe_ds  # noqa: F401  (registers the smoe_lm model type)

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not an exported smoe-ds model (no config.json); run smoe_ds.convert first")
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    if k is not None:
        if not 1 <= k <= model.num_experts:
            raise ConfigError(f"k must be in [1, {model.num_experts}], got {k}")
        set_active_experts(model, k)
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside the model, or UTF-8 bytes when there is none."""
    from smoe_ds.data import ByteTokenizer

    path = Path(path)
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return ByteTokenizer()
