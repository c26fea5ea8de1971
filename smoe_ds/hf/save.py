"""Write a converted model out: as an SMoE directory that reloads at any k, or densified back
into a plain model of the original architecture.

An SMoE directory is a standard Hugging Face one (``config.json`` + ``model.safetensors``, or
shards with their index) whose config has model_type ``smoe_dropout_hf`` (``smoe_ds.hf.smoe_config``):
after ``import smoe_ds`` the Auto classes load it (``smoe_ds.hf.auto``), and without smoe_ds
transformers refuses it rather than load the dense model with its FFNs missing.

``smoe_ds.hf.conversion.convert_model`` makes a converted model's own ``save_pretrained`` write
one (``save_pretrained`` below), so Trainer's ``save_model`` and checkpoints, and any script that
saves the usual way, keep the experts and the router.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from pathlib import Path

from transformers import PreTrainedModel

from smoe_ds.config.schema import ConfigError
from smoe_ds.distributed.zero3 import is_partitioned
from smoe_ds.hf.families import family_for
from smoe_ds.hf.smoe_config import SMoEHFConfig
from smoe_ds.hf.surgery import converted_ffns, model_ep_size, spec_of

# A sharded model -> its gathered single-device copy, while every rank takes part in a Trainer save
# (``smoe_ds.hf.trainer_deepspeed.save_model_gathering_experts``); weak so a copy never outlives its save.
_WHOLE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
HOW_TO_SAVE_SHARDED = (
    "call trainer.save_model() on every rank after SMoEDropoutCallback(...).install(trainer), which gathers them"
)


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
    # the class's own save_pretrained: the original architecture's config, not the SMoE one
    type(model).save_pretrained(model, out, state_dict=dense_state_dict(model))
    return out


def save_smoe(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Write the SMoE model (every weight, router included) as a Hugging Face directory that
    ``AutoModel.from_pretrained`` (after ``import smoe_ds``) and ``load_smoe`` rebuild at the current k.
    The same as ``model.save_pretrained(out_dir)``, but refuses a model that was not converted."""
    spec_of(model)  # refuses an unconverted model before anything is written
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | Path,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    **kwargs,
) -> None:
    """A converted model's ``save_pretrained`` (``bind_save_pretrained``): transformers' own, which
    writes the weights (``state_dict`` if given, e.g. Trainer's gathered ZeRO-3 weights; tied ones
    once; sharded past ``max_shard_size``), then the SMoE config over the original one.

    ConfigError, before anything is written, where the weights would not reload: this rank holds
    only its experts (expert parallelism: ``HOW_TO_SAVE_SHARDED``), ZeRO-3 partitions the weights
    and no ``state_dict`` is given, or an option the loader cannot follow (``variant``,
    ``push_to_hub``).
    """
    whole = _WHOLE_COPIES.get(model)
    if whole is not None:  # every rank gathered the experts for this save: rank 0 writes the copy
        return whole.save_pretrained(save_directory, is_main_process=is_main_process, push_to_hub=push_to_hub, **kwargs)
    if kwargs.get("variant") is not None or push_to_hub:
        option = "variant" if kwargs.get("variant") is not None else "push_to_hub"
        raise ConfigError(
            f"save_pretrained of an SMoE-Dropout model takes no {option}: save to a directory "
            "(then upload it with huggingface_hub.upload_folder)"
        )
    # Trainer passes an empty state_dict where ZeRO-3 does not gather weights on save, and deletes
    # the file it gives: nothing is lost by letting it through.
    if state_dict != {}:
        _check_whole(model, state_dict)
    smoe_config = SMoEHFConfig.of(model)
    signature = inspect.signature(type(model).save_pretrained).parameters
    if "save_original_format" in signature:  # transformers 5: keep the names the loader expects
        kwargs.setdefault("save_original_format", False)
    type(model).save_pretrained(model, save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
    if is_main_process:
        smoe_config.save_pretrained(save_directory)  # over the original architecture's config.json


def _check_whole(model: PreTrainedModel, state_dict: dict | None) -> None:
    """ConfigError unless ``model`` (or ``state_dict``) holds every weight of the model, whole."""
    spec = spec_of(model)
    ep_size = model_ep_size(model)
    if ep_size > 1:
        raise ConfigError(
            f"this rank holds {spec.num_experts // ep_size} of the {spec.num_experts} experts of each layer "
            f"(ep_size {ep_size}): {HOW_TO_SAVE_SHARDED}"
        )
    if state_dict is None and any(is_partitioned(p) for p in model.parameters()):
        raise ConfigError(
            "ZeRO-3 partitions this model's weights: save with trainer.save_model() on every rank "
            '(with "stage3_gather_16bit_weights_on_model_save": true), or gather them first'
        )


def bind_save_pretrained(model: PreTrainedModel) -> None:
    """Make ``model.save_pretrained`` write an SMoE directory (``save_pretrained``); the class's own,
    which writes the original architecture, stays ``type(model).save_pretrained``."""
    model.save_pretrained = types.MethodType(save_pretrained, model)


@contextlib.contextmanager
def saving_whole_copy(model: PreTrainedModel, whole: PreTrainedModel | None):
    """Within: ``model.save_pretrained`` writes ``whole`` (its gathered copy; None on ranks that
    do not write, where nothing changes)."""
    if whole is None:
        yield
        return
    _WHOLE_COPIES[model] = whole
    try:
        yield
    finally:
        _WHOLE_COPIES.pop(model, None)
