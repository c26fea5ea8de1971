"""Feed-forward networks: one FFN (the dense baseline, DeepSpeed's stock experts) and the
stacked experts of the fast SMoE-Dropout layer.

Shape legend: T tokens reaching this rank's experts, D d_model, E local experts, H expert
width, R routes (token, expert pairs) with a non-zero gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """x [..., D] -> GELU(x W_in^T) W_out^T [..., D], hidden width H, no biases.

    Without biases, N experts of width H hold exactly the parameters of one dense FFN of
    width N * H, which keeps the dense baseline's parameter count equal.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


# The compute path is a documented rule, not a flag. The dense-masked path runs every expert
# on every token and scales each expert's H hidden units by its gate; the grouped path runs
# only the routed (token, expert) pairs and scales whichever side of the second GEMM is
# narrower. Measured on 2 CPU threads (python -m smoe_ds.bench): the grouped path costs about
# 1.0-1.4 x (k/N) of a dense FFN plus the sort and gather, so it loses to the dense-masked one
# above k/N of about 3/4.
DENSE_PATH_MIN_DENSITY = 0.75


_GROUPED_MM_FAILED: set = set()  # (device type, dtype) pairs whose backend refused torch._grouped_mm


def grouped_matmul(x_RA: torch.Tensor, w_EAB: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x_RA``, sorted by expert with ``counts[e]`` rows for expert e, times w_EAB[e] -> [R, B]."""
    key = (x_RA.device.type, x_RA.dtype)
    if hasattr(torch, "_grouped_mm") and key not in _GROUPED_MM_FAILED:
        try:
            offs = torch.tensor(counts, device=x_RA.device).cumsum(0).to(torch.int32)
            return torch._grouped_mm(x_RA, w_EAB, offs=offs)
        except (RuntimeError, NotImplementedError):  # e.g. fp32 on GPUs whose kernels take bf16 only
            _GROUPED_MM_FAILED.add(key)
    parts = [xe @ w_EAB[e] for e, xe in enumerate(x_RA.split(counts))]
    return torch.cat(parts)


class GroupedExperts(nn.Module):
    """E experts held as two stacked weights, so they run as grouped or concatenated GEMMs.

    ``w_in`` [E, H, D] holds each expert's ``nn.Linear(D, H).weight`` and ``w_out`` [E, H, D]
    the transpose of each ``nn.Linear(H, D).weight``; both layouts make the dense path's
    concatenated matrices free views. The state dict is written and read in the per-expert
    layout of ``FeedForward`` under ``deepspeed_experts.{e}``, which is what DeepSpeed's
    checkpointing splits into one file per global expert.
    """

    def __init__(self, num_local_experts: int, d_model: int, d_hidden: int, group_name: str) -> None:
        super().__init__()
        self.num_local_experts, self.d_model, self.d_hidden = num_local_experts, d_model, d_hidden
        bound = 1.0 / math.sqrt(d_model)
        self.w_in = nn.Parameter(torch.empty(num_local_experts, d_hidden, d_model).uniform_(-bound, bound))
        self.w_out = nn.Parameter(torch.empty(num_local_experts, d_hidden, d_model).uniform_(-bound, bound))
        for p in (self.w_in, self.w_out):
            # What DeepSpeed's Experts wrapper marks: reduce over the expert-data-parallel group only.
            p.allreduce = False
            p.group_name = group_name
        self._layout_hooks = [
            self.register_state_dict_post_hook(_to_per_expert_state),
            self.register_load_state_dict_pre_hook(_from_per_expert_state),
        ]

    def use_stacked_state_dict(self) -> None:
        """Save and load ``w_in``/``w_out`` as the stacked tensors they are (single-file exports)."""
        for handle in self._layout_hooks:
            handle.remove()
        self._layout_hooks = []

    def forward(self, x_TD: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        """sum_e gates_TE[t, e] * expert_e(x_TD[t]) -> [T, D]; zero gates cost nothing on the sparse path."""
        density = float((gates_TE != 0).sum()) / max(gates_TE.numel(), 1)
        if density >= DENSE_PATH_MIN_DENSITY:
            return self.forward_dense(x_TD, gates_TE)
        return self.forward_sparse(x_TD, gates_TE)

    def forward_dense(self, x_TD: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by the gates (zero gates included): no dispatch.

        Narrow experts (H <= D): one GEMM over the concatenated experts, each expert's H hidden
        units scaled by its gate. Wide experts (H > D): one GEMM pair per expert over all
        tokens, scaling the D-wide outputs, which is less memory traffic than the hidden units.
        """
        T, E, H = x_TD.shape[0], self.num_local_experts, self.d_hidden
        gates_TE = gates_TE.to(x_TD.dtype)
        if H <= self.d_model:
            h_TEH = F.gelu(x_TD @ self.w_in.view(E * H, -1).t()).view(T, E, H)
            return (h_TEH * gates_TE.unsqueeze(-1)).view(T, E * H) @ self.w_out.view(E * H, -1)
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):
            y_TD = y_TD + gates_TE[:, e : e + 1] * (F.gelu(x_TD @ self.w_in[e].t()) @ self.w_out[e])
        return y_TD

    def forward_sparse(self, x_TD: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        """Sort the routes by expert, run grouped GEMMs, scatter-add the weighted rows back."""
        expert_R, token_R = gates_TE.t().nonzero(as_tuple=True)  # row-major over [E, T]: sorted by expert
        counts = torch.bincount(expert_R, minlength=self.num_local_experts).tolist()
        gate_R = gates_TE[token_R, expert_R].to(x_TD.dtype)
        h_RH = F.gelu(grouped_matmul(x_TD.index_select(0, token_R), self.w_in.transpose(1, 2), counts))
        # The gate scales a row of the second GEMM's input or of its output: the same result, so
        # scale the narrower of the two.
        if self.d_hidden <= self.d_model:
            y_RD = grouped_matmul(h_RH * gate_R.unsqueeze(-1), self.w_out, counts)
        else:
            y_RD = grouped_matmul(h_RH, self.w_out, counts) * gate_R.unsqueeze(-1)
        return torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)


def _to_per_expert_state(module: GroupedExperts, state: dict, prefix: str, local_metadata) -> None:
    w_in, w_out = state.pop(prefix + "w_in"), state.pop(prefix + "w_out")
    for e in range(module.num_local_experts):
        state[f"{prefix}deepspeed_experts.{e}.w_in.weight"] = w_in[e]
        state[f"{prefix}deepspeed_experts.{e}.w_out.weight"] = w_out[e].t()


def _from_per_expert_state(module: GroupedExperts, state: dict, prefix: str, *args) -> None:
    names = [
        f"{prefix}deepspeed_experts.{e}.w_{io}.weight" for e in range(module.num_local_experts) for io in ("in", "out")
    ]
    if prefix + "w_in" in state or not all(n in state for n in names):
        return  # stacked already, or incomplete: load_state_dict reports the missing keys itself
    E = module.num_local_experts
    state[prefix + "w_in"] = torch.stack([state.pop(f"{prefix}deepspeed_experts.{e}.w_in.weight") for e in range(E)])
    state[prefix + "w_out"] = torch.stack(
        [state.pop(f"{prefix}deepspeed_experts.{e}.w_out.weight").t() for e in range(E)]
    )
