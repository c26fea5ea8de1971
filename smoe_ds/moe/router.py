"""The frozen random router of SMoE-Dropout, as a DeepSpeed MoE gate.

Shape legend (torchtitan style): S tokens on this rank, D = d_model, N experts, K active
experts (k), C expert capacity (slots per expert per rank).

``FrozenRandomGate`` plugs into ``deepspeed.moe.sharded_moe.MOELayer`` in place of
``TopKGate``. MOELayer calls ``gate(x_SD, used_token, True, use_tutel)`` and expects the
sparse-route 7-tuple ``(l_aux, C, N, indices_KS, locations_KS, gates_KS, exp_counts_N)``
where a route that was dropped for lack of capacity has index -1.

The router is a ``Linear(D -> N)`` drawn from ``(router_seed, layer_index)`` and frozen
from step 0: ``requires_grad=False``, so it is in no optimizer group, gets no weight decay
and is bit-identical after any amount of training. Its weight is named ``wg.weight`` so
that DeepSpeed keeps it in the non-expert checkpoint file (its MoE filter drops keys that
contain "expert" but keeps ``moe.gate.wg.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def frozen_router_weight(d_model: int, num_experts: int, router_seed: int, layer_index: int) -> torch.Tensor:
    """The router weight [N, D] of one layer: a pure function of its arguments.

    Drawn on the CPU from its own generator, so it is identical on every rank whatever
    the world size, the ep_size or the global RNG state. Std 1/sqrt(D) keeps the logits
    O(1) for unit-scale inputs, like nn.Linear's default init.
    """
    gen = torch.Generator().manual_seed(router_seed * 1_000_003 + layer_index)
    return torch.randn(num_experts, d_model, generator=gen) / math.sqrt(d_model)


def topk_routes(logits_SN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k best experts and their weights.

    Returns ``expert_ids_SK`` (long) sorted by logit, and ``weights_SK`` (fp32), the
    softmax over the k selected logits only, so each row sums to 1.
    """
    top_logits_SK, expert_ids_SK = logits_SN.float().topk(k, dim=-1)
    return expert_ids_SK, torch.softmax(top_logits_SK, dim=-1)


def slot_positions(expert_ids_SK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every route inside its expert's buffer, and the per-expert counts.

    Routes are numbered route-major (every token's first choice before any second choice),
    so when capacity runs out it is the lower-ranked choices that are dropped first.
    Returns ``positions_KS`` (long) and ``counts_N`` (long).
    """
    flat_ids = expert_ids_SK.t().reshape(-1)  # [K*S], route-major
    order = torch.argsort(flat_ids, stable=True)
    counts_N = torch.bincount(flat_ids, minlength=num_experts)
    group_start_N = torch.cumsum(counts_N, 0) - counts_N
    positions = torch.empty_like(flat_ids)
    positions[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - group_start_N[flat_ids[order]]
    return positions.view(expert_ids_SK.shape[1], -1), counts_N


def capacity_for(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(cf * k * S / N): scales with the current k; at least 1."""
    return max(1, math.ceil(capacity_factor * k * num_tokens / num_experts))


def _max_over_group(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The maximum of ``value`` over ``group``: every EP rank must use the same capacity,
    even when the ranks hold different numbers of tokens."""
    if group is None or dist.get_world_size(group=group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


class FrozenRandomGate(nn.Module):
    """SMoE-Dropout's router with DeepSpeed's gate interface. ``k`` may change at any time."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        router_seed: int,
        layer_index: int,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        with torch.no_grad():
            self.wg.weight.copy_(frozen_router_weight(d_model, num_experts, router_seed, layer_index))
        self.wg.weight.requires_grad_(False)
        self.wg.weight.smoe_frozen_router = True  # lets weight init skip it
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.ep_group: dist.ProcessGroup | None = None
        # Filled on every forward, read by the trainer's logging (tensors: no host sync here).
        self.last_counts_N: torch.Tensor | None = None
        self.last_dropped_routes: torch.Tensor | None = None
        self.last_total_routes = 0

    def _set_ep_group(self, ep_group) -> None:  # called by MOELayer._set_ep_group
        self.ep_group = ep_group

    def forward(self, x_SD: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if used_token is not None or not sparse_routes or use_tutel:
            raise NotImplementedError("FrozenRandomGate supports only DeepSpeed's sparse-route dispatch")
        k, n = self.k, self.num_experts
        # fp32 logits whatever the activation dtype, so bf16/fp16 training routes like fp32.
        logits_SN = torch.nn.functional.linear(x_SD.float(), self.wg.weight.float())
        expert_ids_SK, weights_SK = topk_routes(logits_SN, k)
        positions_KS, counts_N = slot_positions(expert_ids_SK, n)
        indices_KS = expert_ids_SK.t()
        gates_KS = weights_SK.t()

        if self.capacity_factor is None:  # dropless: the fullest expert sets the capacity
            capacity = _max_over_group(int(counts_N.max()) if counts_N.numel() else 0, self.ep_group, x_SD.device)
            capacity = max(capacity, 1)
            kept_KS = torch.ones_like(indices_KS, dtype=torch.bool)
        else:
            local = capacity_for(x_SD.shape[0], k, n, self.capacity_factor)
            capacity = _max_over_group(local, self.ep_group, x_SD.device)
            kept_KS = positions_KS < capacity

        self.last_counts_N = counts_N.detach()
        self.last_dropped_routes = (~kept_KS).sum().detach()
        self.last_total_routes = indices_KS.numel()

        indices_KS = torch.where(kept_KS, indices_KS, torch.full_like(indices_KS, -1)).int()
        locations_KS = (positions_KS * kept_KS).int()
        # A dropped route contributes nothing; the kept weights are not renormalised, so a
        # token keeps the same weight on each expert whatever happens to its other routes.
        gates_KS = gates_KS * kept_KS
        l_aux = x_SD.new_zeros((), dtype=torch.float32)  # SMoE-Dropout has no balance loss
        return l_aux, torch.tensor(capacity), n, indices_KS, locations_KS, gates_KS, counts_N
