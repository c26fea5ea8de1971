"""Write a converted model out: as an SMoE directory that reloads at any k, or densified back
into a plain model of the original architecture.

An SMoE directory holds ``smoe_config.json`` (family, N, weighting, router seed, the k it was
saved at, the original architecture and its config) and ``smoe_model.safetensors``. The names
differ from ``config.json`` / ``model.safetensors`` on purpose: plain ``from_pretrained`` must
not load such a directory as the dense model with its FFNs missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import transformers
from safetensors.torch import load_model, save_model
from transformers import PreTrainedModel

from smoe_ds.config import ConfigError
from smoe_ds.hf.convert import SMoESpec, active_experts, convert_model, converted_ffns, spec_of
from smoe_ds.hf.families import family_for
from smoe_ds.moe.layer import set_active_experts

SMOE_CONFIG = "smoe_config.json"
SMOE_WEIGHTS = "smoe_model.safetensors"
FORMAT_VERSION = 1


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
    """Write the SMoE model (every weight, router included) and what ``load_smoe`` needs to rebuild it."""
    spec = spec_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        **asdict(spec),
        "active_experts": active_experts(model),
        "architecture": type(model).__name__,
        "base_config": model.config.to_dict(),
    }
    (out / SMOE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_model(model, str(out / SMOE_WEIGHTS))  # handles tied weights (e.g. GPT-2's lm_head)
    return out


def load_smoe(path: str | Path) -> PreTrainedModel:
    """Rebuild a model written by ``save_smoe``: the original architecture from its config,
    converted the same way, then the saved weights; it runs at the saved k."""
    src = Path(path)
    if not (src / SMOE_CONFIG).is_file():
        raise ConfigError(f"{src}: not an SMoE-Dropout directory (no {SMOE_CONFIG})")
    meta = json.loads((src / SMOE_CONFIG).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{src / SMOE_CONFIG}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    model_cls = getattr(transformers, meta["architecture"], None)
    if model_cls is None:
        raise ConfigError(f"{src}: transformers has no model class {meta['architecture']!r}")
    spec = SMoESpec(**{f: meta[f] for f in SMoESpec.__dataclass_fields__})
    # The dense weights drawn here are overwritten by the file: only the structure matters.
    model = model_cls(transformers.AutoConfig.for_model(**meta["base_config"]))
    convert_model(model, spec.num_experts, spec.weighting, spec.router_seed)
    load_model(model, str(src / SMOE_WEIGHTS))  # strict: any missing or unexpected key is an error
    set_active_experts(model, meta["active_experts"])
    return model.eval()
