"""One single-device copy of a converted model that DeepSpeed trains with its experts sharded.

Under expert parallelism each rank holds N / ep_size experts of every converted FFN (see
``ConvertedFFN.from_dense``); every other weight is whole on every rank (ZeRO-1/2 shard the
optimizer state and gradients, not the weights). ``single_device_copy`` all-gathers the expert
slices inside each expert-parallel group and, on rank 0, puts them with the other weights into
a fresh ep_size-1 conversion of the same architecture, in fp32 whatever the training precision:
the model ``save_smoe`` writes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from smoe_ds.hf.conversion import convert_model
from smoe_ds.hf.surgery import converted_ffns, spec_of
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.moe.parallel import expert_parallel_group

EXPERT_ROLES = ("w_in", "b_in", "w_gate", "w_out")


def gather_expert_parts(t: torch.Tensor, ep_size: int) -> list[torch.Tensor]:
    """This rank's tensor -> the same tensor of every rank of its expert-parallel group, by EP rank."""
    if ep_size == 1:
        return [t.detach().clone()]
    group = expert_parallel_group(ep_size)
    parts = [torch.empty_like(t) for _ in range(ep_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return parts


def _gather_experts(t: torch.Tensor, ep_size: int) -> torch.Tensor:
    """This rank's [E, ...] expert slice -> all N = E x ep_size experts [N, ...], in expert-id order."""
    return torch.cat(gather_expert_parts(t, ep_size))


def single_device_copy(model: PreTrainedModel, ep_size: int, k: int) -> PreTrainedModel | None:
    """Every rank calls this together; rank 0 gets the whole model (all experts, running at ``k``),
    the others None. ``model`` is the engine's module (a converted model, sharded or not)."""
    spec = spec_of(model)
    experts = {
        prefix: {
            role: _gather_experts(t, ep_size) for role in EXPERT_ROLES if (t := getattr(ffn.experts, role)) is not None
        }
        for prefix, ffn in converted_ffns(model)
    }
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    copy = type(model)(model.config)  # random weights, all replaced below
    convert_model(copy, spec.num_experts, spec.weighting, spec.router_seed)
    others = {
        name: t
        for name, t in model.state_dict().items()
        if not any(name.startswith(p) and ".experts." in name for p in experts)
    }
    missing, unexpected = copy.load_state_dict(others, strict=False)
    leftover = [name for name in missing if ".experts." not in name]
    if leftover or unexpected:
        raise RuntimeError(f"single-device copy: missing {leftover[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for prefix, ffn in converted_ffns(copy):
            for role, full in experts[prefix].items():
                getattr(ffn.experts, role).copy_(full)
    set_active_experts(copy, k)
    return copy.eval()
