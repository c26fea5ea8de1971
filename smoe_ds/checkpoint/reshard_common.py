"""What both resharders (``reshard`` for ZeRO-1/2, ``reshard_zero3``) share: the optimizer fields
they carry, and the mapping between a rank's parameters and the checkpoint's global entries.

A stacked expert parameter of shape [n_local, ...] on expert-parallel rank ``ep_rank`` becomes
one entry per expert, named by its global expert id (``ep_rank * n_local + i``); every other
parameter is one entry, its name made global (``smoe_ds.moe.experts.global_expert_name``).
"""

from __future__ import annotations

import torch

from smoe_ds.moe.experts import global_expert_name, is_stacked_expert_param, split_stacked, stack_experts
from smoe_ds.moe.parallel import local_experts

OPTIMIZER_FIELDS = ("fp32", "exp_avg", "exp_avg_sq")  # fp32 master weights and Adam's two moments


def checkpoint_entries(name: str, tensor: torch.Tensor, ep_rank: int, n_local: int) -> dict[str, torch.Tensor]:
    """A rank's parameter ``name`` as checkpoint entries: stacked experts split per expert, global ids."""
    if is_stacked_expert_param(name):
        return {k: v.contiguous() for k, v in split_stacked(name, tensor, first_expert=ep_rank * n_local).items()}
    return {global_expert_name(name, ep_rank, n_local): tensor}


def local_value(full: dict[str, torch.Tensor], name: str, ep_rank: int, ep_size: int, num_experts: int) -> torch.Tensor:
    """The inverse of ``checkpoint_entries``: this rank's parameter ``name`` from global entries."""
    if is_stacked_expert_param(name):
        return stack_experts(full, name, local_experts(ep_rank, ep_size, num_experts))
    return full[global_expert_name(name, ep_rank, num_experts // ep_size)]
