"""Write a converted model out: as an SMoE directory that reloads at any k, or densified back
into a plain model of the original architecture.

An SMoE directory is a standard Hugging Face one (``config.json`` + ``model.safetensors``) whose
config has model_type ``smoe_dropout_hf`` (see ``smoe_ds.hf.auto``): after ``import smoe_ds``
the Auto classes load it, and without smoe_ds transformers refuses it rather than load the dense
model with its FFNs missing.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_model
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf.auto import SMoEDropoutLoader, SMoEHFConfig
from smoe_ds.hf.families import family_for
from smoe_ds.hf.surgery import converted_ffns, spec_of


def dense_state_dict(model: PreTrainedModel) -> dict:
    """The state dict of the original architecture: every converted block's FFN keys replaced by
    the dense FFN's (expert slices concatenated back, original names and layouts)."""
    family = family_for(model.config.model_type)
    state = model.state_dict()
    for prefix, ffn in converted_ffns(model):
        for key in [k for k in state if k.startswith(prefix + family.replaced + ".")]:
            del state[key]
        state.update(family.state(ffn.to_dense(), prefix))
    return state


def export_dense(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Densify: write ``model`` as a plain Hugging Face model of its original architecture.

    The output loads with ``transformers`` alone and computes what ``model`` computes at k = N.
    Only ``rescale`` models can be densified: there every gate is 1 at k = N and the experts
    sum to one dense FFN. Under ``softmax`` each token's k = N weights are a softmax over all N
    router logits, different per token and not 1, which no single dense FFN reproduces.
    """
    spec = spec_of(model)
    if spec.weighting != "rescale":
        raise ConfigError(
            f"cannot densify a {spec.weighting!r}-weighted SMoE model: at k = N its expert weights are a "
            "per-token softmax over the router logits, not all 1, so no dense FFN computes it "
            "(only 'rescale' models densify exactly)"
        )
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=dense_state_dict(model))
    return out


def save_smoe(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Write the SMoE model (every weight, router included) as a Hugging Face directory that
    ``AutoModel.from_pretrained`` (after ``import smoe_ds``) and ``load_smoe`` rebuild at the current k."""
    config = SMoEHFConfig.of(model)  # refuses an unconverted model before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    # safetensors' save_model drops tied duplicates (e.g. GPT-2's lm_head); "pt" is the format
    # transformers' own files declare.
    save_model(model, str(out / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_smoe(path: str | Path) -> PreTrainedModel:
    """Rebuild a model written by ``save_smoe`` (the original architecture from its config, converted
    the same way, then the saved weights); it runs at the saved k. Same as ``AutoModel.from_pretrained``."""
    return SMoEDropoutLoader.from_pretrained(path)
