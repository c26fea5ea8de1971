"""``convert_model``: a pretrained dense Hugging Face model made an SMoE-Dropout model, in place.

It splits every FFN into experts behind frozen random routers (``smoe_ds.hf.surgery.split_ffns``) and
gives the model a ``save_pretrained`` that writes an SMoE directory (``smoe_ds.hf.save``), which
``AutoModel.from_pretrained`` rebuilds after ``import smoe_ds``.

    model = AutoModel.from_pretrained(path)
    convert_model(model, num_experts=4)
    set_active_experts(model, 2)  # smoe_ds.moe.layer's helper: any k in [1, N]
    model.save_pretrained(out)
"""

from __future__ import annotations

from transformers import PreTrainedModel

from smoe_ds.hf.save import bind_save_pretrained
from smoe_ds.hf.surgery import DEFAULT_ROUTER_SEED, split_ffns


def convert_model(
    model: PreTrainedModel,
    num_experts: int,
    weighting: str = "rescale",
    router_seed: int = DEFAULT_ROUTER_SEED,
    ep_size: int = 1,
    ep_rank: int = 0,
    for_deepspeed: bool = False,
) -> PreTrainedModel:
    """``split_ffns`` (its arguments, refusals and layouts), then bind the SMoE ``save_pretrained``.
    Returns ``model`` itself, running at k = N."""
    split_ffns(model, num_experts, weighting, router_seed, ep_size, ep_rank, for_deepspeed)
    bind_save_pretrained(model)  # save_pretrained writes the SMoE directory, not the original config
    return model
