"""The routes of a batch of tokens at a fixed k, and their layout for grouped GEMMs, built on the
device with no host sync.

Shape legend (``smoe_ds.moe``): T tokens, K routes per token, E experts, R = T x K routes in
token-major order (route r = t * K + j is token t's j-th choice), Q rows of the padded buffer.

A top-k router gives every token exactly K distinct experts, so every size here follows from T, K
and E, which the host knows: nothing is read back from the device (no ``nonzero``, ``tolist`` or
``item``), which keeps a GPU's queue full and lets the layer run under ``torch.compile(fullgraph=True)``
and inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routes:
    """Each token's K experts and their gates.

    ``expert_TK`` [T, K] long, distinct in each row; ``gate_TK`` [T, K] (0 for a route dropped by a
    capacity, which then contributes nothing); ``num_experts`` E, the experts the ids index;
    ``density`` the share of (token, expert) pairs routed, K / N of the schedule: a host number,
    from which the experts choose their compute path without looking at the data.
    """

    expert_TK: torch.Tensor
    gate_TK: torch.Tensor
    num_experts: int
    density: float

    def dense(self) -> torch.Tensor:
        """The gates as a [T, E] matrix, zero where a token has no route."""
        zeros_TE = self.gate_TK.new_zeros((self.gate_TK.shape[0], self.num_experts))
        return zeros_TE.scatter(1, self.expert_TK, self.gate_TK)

    @classmethod
    def from_dense(cls, gates_TE: torch.Tensor, k: int, density: float) -> Routes:
        """The ``k`` largest gates of each row of [T, E] as routes (zero gates included when a row
        has fewer non-zero ones: they cost work, not correctness), so the size stays T x k."""
        gate_TK, expert_TK = gates_TE.topk(k, dim=1)
        return cls(expert_TK, gate_TK, gates_TE.shape[1], density)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert [E] (long) of any tensor of expert ids. Integer sums, so the result is exact
    whatever order they are added in; unlike ``bincount``, the output size never depends on the
    data, so a GPU need not read the largest id back."""
    flat = expert_ids.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def group_alignment(x: torch.Tensor) -> int:
    """Rows per alignment unit of a grouped GEMM's groups: 16 bytes of ``x``'s dtype (8 rows in
    bf16), the padding torchtitan gives each expert's group for ``torch._grouped_mm``."""
    return max(1, 16 // x.element_size())


@dataclass(frozen=True)
class GroupedLayout:
    """Routes sorted by expert (stable: by token within an expert), each expert's group padded to
    a multiple of the alignment, in a buffer of Q = R + E x (align - 1) rows, the worst case.

    ``slot_R`` [R]: the buffer row of route r. ``route_Q`` [Q]: the route in each row, R for a
    padding row. ``offs_E`` [E] int32: where each expert's group ends (``torch._grouped_mm``'s
    ``offs``); the last group runs to Q, so every row belongs to a group and none is left
    uninitialised by the GEMM.
    """

    slot_R: torch.Tensor
    route_Q: torch.Tensor
    offs_E: torch.Tensor

    def expert_Q(self) -> torch.Tensor:
        """The expert of each buffer row [Q]: the groups whose ends lie at or before it."""
        rows_Q = torch.arange(self.route_Q.shape[0], device=self.offs_E.device, dtype=self.offs_E.dtype)
        return torch.searchsorted(self.offs_E, rows_Q, right=True)


def grouped_layout(expert_TK: torch.Tensor, num_experts: int, align: int) -> GroupedLayout:
    """The padded layout of routes ``expert_TK`` [T, K] over ``num_experts`` experts (see
    ``GroupedLayout``), by a stable sort, a binary search for the group bounds and cumulative
    sums, all on the device."""
    device, E = expert_TK.device, num_experts
    R = expert_TK.numel()
    Q = R + E * (align - 1)
    sorted_R, order_R = torch.sort(expert_TK.reshape(-1), stable=True)
    # bounds[e]: the sorted routes to experts below e, so expert e's routes are bounds[e] .. bounds[e + 1]
    bounds = torch.searchsorted(sorted_R, torch.arange(E + 1, device=device, dtype=sorted_R.dtype))
    counts_E = bounds[1:] - bounds[:-1]
    ends_E = ((counts_E + align - 1) // align * align).cumsum(0)
    padded_starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    slot_sorted = torch.arange(R, device=device) + (padded_starts_E - bounds[:-1])[sorted_R]
    slot_R = torch.empty_like(order_R).scatter_(0, order_R, slot_sorted)  # every index once: no race
    route_Q = torch.full((Q,), R, device=device, dtype=order_R.dtype).scatter_(0, slot_sorted, order_R)
    offs_E = ends_E.to(torch.int32)
    offs_E[-1] = Q  # the tail of padding joins the last group
    return GroupedLayout(slot_R, route_Q, offs_E)
