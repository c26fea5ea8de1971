"""The frozen random router of SMoE-Dropout.

Shape legend (torchtitan style): S tokens on this rank, D d_model, N experts, K active
experts (k).

The router is a ``Linear(D -> N)`` drawn from ``(router_seed, layer_index)`` and frozen
from step 0: ``requires_grad=False``, so it is in no optimizer group, gets no weight decay
and is bit-identical after any amount of training. It lives at ``deepspeed_moe.gate.wg``
so that DeepSpeed keeps it in the non-expert checkpoint file (its MoE filter drops keys
that contain "expert" but keeps ``moe.gate.wg.weight``).

The router still passes gradient to its input: the gate weights are a softmax of
``x @ W^T``, so the loss depends on x through them as well as through the experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smoe_ds.moe.routes import Routes, expert_counts


def frozen_router_weight(
    d_model: int, num_experts: int, router_seed: int, layer_index: int, init_std: float | None = None
) -> torch.Tensor:
    """The router weight [N, D] of one layer: a pure function of its arguments.

    Drawn on the CPU from its own generator, so it is identical on every rank whatever
    the world size, the ep_size or the global RNG state. ``init_std`` None means 1/sqrt(D),
    which keeps the logits O(1) for unit-scale inputs (nn.Linear's default scale); the
    paper's released code uses 0.02, its init for every Linear. The same draw is scaled,
    so two stds give routers that pick the same top-k and differ only in how sharp the
    softmax over the selected logits is.
    """
    gen = torch.Generator().manual_seed(router_seed * 1_000_003 + layer_index)
    std = 1.0 / math.sqrt(d_model) if init_std is None else init_std
    return torch.randn(num_experts, d_model, generator=gen) * std


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
    counts_N = expert_counts(flat_ids, num_experts)
    group_start_N = torch.cumsum(counts_N, 0) - counts_N
    positions = torch.empty_like(flat_ids)
    positions[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - group_start_N[flat_ids[order]]
    return positions.view(expert_ids_SK.shape[1], -1), counts_N


def capacity_for(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(cf * k * S / N): scales with the current k; at least 1."""
    return max(1, math.ceil(capacity_factor * k * num_tokens / num_experts))


WEIGHTINGS = ("softmax", "rescale", "uniform")
ROUTINGS = ("frozen", "random")


class FrozenRandomGate(nn.Module):
    """x_SD -> each token's top-k experts and their weights: ``route`` gives them as ``Routes``
    ([S, K] ids and gates), ``forward`` as dense gates_SN, zero elsewhere.

    ``weighting`` "softmax" (the paper's): a softmax over the k selected logits. "rescale"
    (dropout-style, for FFNs split from a pretrained dense one): N / k for every selected
    expert, so that at k = N every gate is exactly 1 and the experts sum to the dense FFN.
    "uniform" (THOR's): 1 / k for every selected expert. ``routing`` "random" (THOR) ignores
    the router and draws k distinct experts per token, afresh on every forward, from torch's
    global RNG (so checkpointed RNG states make it reproducible).
    ``k`` may change between any two forwards. With ``capacity_factor`` set, each expert
    takes at most C = ceil(cf * k * S / N) of this rank's routes, first choices first; a
    dropped route's gate is zero and the token's other weights are not renormalised.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        router_seed: int,
        layer_index: int,
        capacity_factor: float | None = None,
        weighting: str = "softmax",
        routing: str = "frozen",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.weighting, self.routing = weighting, routing
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        with torch.no_grad():
            self.wg.weight.copy_(frozen_router_weight(d_model, num_experts, router_seed, layer_index, init_std))
        self.wg.weight.requires_grad_(False)
        self.wg.weight.smoe_frozen_router = True  # lets weight init skip it
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        # Filled on every forward, read by the trainer's logging (tensors: no host sync here).
        self.last_counts_N: torch.Tensor | None = None
        self.last_dropped_routes: torch.Tensor | None = None
        self.last_total_routes = 0

    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        """Dense gates [S, N]: each token's top-k weights, zero elsewhere."""
        return self.route(x_SD).dense()

    def route(self, x_SD: torch.Tensor) -> Routes:
        """Each token's k experts and weights [S, K]; nothing here reads the device back, so k is
        the only thing that sizes the result."""
        k, n = self.k, self.num_experts
        # fp32 logits whatever the activation dtype, so bf16/fp16 training routes like fp32.
        if self.routing == "random":  # top-k of i.i.d. uniform scores: k distinct experts, uniformly
            logits_SN = torch.rand(x_SD.shape[0], n, device=x_SD.device)
        else:
            logits_SN = F.linear(x_SD.float(), self.wg.weight.float())
        self.last_total_routes = x_SD.shape[0] * k
        if k == n and self.capacity_factor is None:  # full capacity: every expert, no selection to make
            self.last_counts_N = torch.full((n,), x_SD.shape[0], device=x_SD.device)
            self.last_dropped_routes = None
            if self.weighting == "softmax":
                weights_SN = torch.softmax(logits_SN, dim=-1)
            else:
                weights_SN = torch.full_like(logits_SN, 1.0 if self.weighting == "rescale" else 1.0 / n)
            every_SN = torch.arange(n, device=x_SD.device).expand(x_SD.shape[0], n)
            return Routes(every_SN, weights_SN, n, density=1.0)
        expert_ids_SK, weights_SK = topk_routes(logits_SN, k)
        if self.weighting != "softmax":  # set, not derived from the softmax, which can underflow to 0
            weights_SK = torch.full_like(weights_SK, n / k if self.weighting == "rescale" else 1.0 / k)
        if self.capacity_factor is not None:
            positions_KS, counts_N = slot_positions(expert_ids_SK, n)
            kept_SK = (positions_KS < capacity_for(x_SD.shape[0], k, n, self.capacity_factor)).t()
            weights_SK = weights_SK * kept_SK
            self.last_dropped_routes = (~kept_SK).sum().detach()
        else:  # dropless: only the load per expert is needed, not each route's slot
            counts_N = expert_counts(expert_ids_SK, n)
            self.last_dropped_routes = None
        self.last_counts_N = counts_N.detach()
        # The density is k / N whatever the gates: a dropped route (gate 0) is still a route the
        # experts may compute, and contributes nothing.
        return Routes(expert_ids_SK, weights_SK, n, density=k / n)
