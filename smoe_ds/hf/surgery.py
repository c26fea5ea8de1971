"""Split a pretrained dense Hugging Face transformer's FFNs into SMoE-Dropout experts, in place.

Each block's FFN (d_model -> F -> d_model) becomes N experts of F / N contiguous hidden units
behind a frozen random router drawn from (router_seed, block index); every other weight is
untouched. ``weighting`` picks the expert weights:

- ``rescale`` (the default here): each of the k selected experts weighted N / k, like inverted
  dropout. At k = N the model computes exactly the pretrained one, so fine-tuning starts from
  it, and ``export_dense`` can write it back as a plain dense model.
- ``softmax`` (the paper's): a softmax over the k selected router logits.

    model = AutoModel.from_pretrained(path)
    convert_model(model, num_experts=4)  # smoe_ds.hf.conversion: split_ffns, then save_pretrained bound
    set_active_experts(model, 2)  # smoe_ds.moe.layer's helper: any k in [1, N]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import PreTrainedModel

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf.families import MODEL_TYPE, Family, family_for
from smoe_ds.hf.ffn import ConvertedFFN
from smoe_ds.moe.layer import moe_layers

DEFAULT_ROUTER_SEED = 1234  # moe.router_seed's default in the trainer's config

# The router's weightings that make sense for a pretrained FFN ("uniform" is THOR's, for training).
HF_WEIGHTINGS = ("softmax", "rescale")


@dataclass(frozen=True)
class SMoESpec:
    """What a conversion did; kept on the model as ``model.smoe_dropout`` and saved with it."""

    family: str
    num_experts: int
    weighting: str
    router_seed: int
    num_layers: int


def dense_config(src: str, convertible: bool = True):
    """SRC's (a local directory or a hub name) ``transformers`` config; ConfigError when it cannot be
    read, is an SMoE directory already, or (``convertible``) is of an architecture we cannot convert."""
    if not Path(src).exists() and (src.startswith((".", "/", "~")) or src.count("/") > 1):
        raise ConfigError(f"{src}: no such model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{src}: cannot read a Hugging Face model config ({str(e).splitlines()[0]})") from e
    if config.model_type == MODEL_TYPE:
        raise ConfigError(f"{src} is an SMoE-Dropout directory already (--densify writes it as a dense model)")
    if convertible:
        family_for(config.model_type)  # refuse an unsupported architecture before loading any weights
    return config


def split_ffns(
    model: PreTrainedModel,
    num_experts: int,
    weighting: str = "rescale",
    router_seed: int = DEFAULT_ROUTER_SEED,
    ep_size: int = 1,
    ep_rank: int = 0,
    for_deepspeed: bool = False,
) -> PreTrainedModel:
    """Replace every block's FFN of ``model`` by an SMoE-Dropout FFN with ``num_experts`` experts
    (``smoe_ds.hf.conversion.convert_model`` does this and gives the model its ``save_pretrained``).

    Returns ``model`` itself, running at k = N. Raises ConfigError for an unsupported
    architecture, a bad weighting, or an N that does not divide the FFN's hidden size.
    For training under DeepSpeed, ``for_deepspeed`` with this rank's ``ep_rank`` keeps only its
    N / ``ep_size`` experts (see ``ConvertedFFN.from_dense``).
    """
    if getattr(model, "smoe_dropout", None) is not None:
        raise ConfigError("the model is already converted to SMoE-Dropout")
    family = family_for(model.config.model_type)
    if weighting not in HF_WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(HF_WEIGHTINGS)}, got {weighting!r}")
    blocks = family.blocks_of(model)
    denses = [family.read(block) for block in blocks]  # read all first: a refusal leaves the model intact
    width = denses[0]["w_in"].shape[0]
    if not 1 <= num_experts <= width or width % num_experts:
        raise ConfigError(
            f"the FFN hidden size {width} of this {model.config.model_type} model is not divisible "
            f"into {num_experts} experts (N must divide it)"
        )
    if num_experts % ep_size:
        raise ConfigError(f"{num_experts} experts cannot be split over ep_size {ep_size} ranks (N must divide by it)")
    activation = family.activation_of(model.config)
    for i, (block, dense) in enumerate(zip(blocks, denses)):
        ffn = ConvertedFFN.from_dense(
            dense, num_experts, activation, weighting, router_seed, i, ep_size, ep_rank, for_deepspeed
        )
        family.install(block, ffn)
    model.smoe_dropout = SMoESpec(family.name, num_experts, weighting, router_seed, len(blocks))
    return model


def spec_of(model: PreTrainedModel) -> SMoESpec:
    spec = getattr(model, "smoe_dropout", None)
    if spec is None:
        raise ConfigError("the model is not an SMoE-Dropout model (convert it with convert_model first)")
    return spec


def converted_ffns(model: PreTrainedModel) -> list[tuple[str, ConvertedFFN]]:
    """(block name prefix with a trailing dot, its SMoE FFN) for every converted block."""
    family: Family = family_for(model.config.model_type)
    names = {module: name for name, module in model.named_modules()}
    return [(names[block] + ".", block.get_submodule(family.replaced)) for block in family.blocks_of(model)]


def model_ep_size(model) -> int:
    """The ep_size a converted model's layers were built with (ConfigError if they disagree)."""
    sizes = sorted({layer.ep_size for layer in moe_layers(model)})
    if not sizes:
        raise ConfigError("the model is not an SMoE-Dropout model (convert it with convert_model first)")
    if len(sizes) != 1:
        raise ConfigError(f"the model's SMoE-Dropout layers disagree on ep_size ({sizes}): convert it once")
    return sizes[0]


def active_experts(model: PreTrainedModel) -> int:
    """The k the model currently runs at."""
    return next(moe_layers(model)).deepspeed_moe.gate.k
