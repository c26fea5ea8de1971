"""Moving tokens to the ranks that hold their experts, and the results back.

Shape legend: S tokens on this rank, D d_model, N experts, P = ep_size ranks in the expert-
parallel group, E = N / P experts per rank, T tokens received, M rows sent (messages), X = D + E
payload columns. The whole legend is in ``smoe_ds.moe``.

DeepSpeed's stock layer sends a token once per chosen expert, padded to a fixed capacity.
Here a token goes at most once to each rank that holds any of its chosen experts, together
with its gates for that rank's experts; the rank sums its experts' weighted outputs and
sends one row back. At k = N every token goes to every rank once, which is the traffic of an
all-gather plus a reduce-scatter. Variable split sizes keep it dropless with no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVES = ("moe_counts", "moe_dispatch", "moe_combine", "moe_dispatch_grad", "moe_combine_grad")
"""The names our collectives carry in DeepSpeed's comms logger (``smoe_ds.step_breakdown``)."""


def _all_to_all(out: torch.Tensor, x: torch.Tensor, out_splits, in_splits, group, name: str) -> None:
    """``all_to_all_single`` through ``deepspeed.comm``, so its comms logger can time it as ``name``."""
    from deepspeed import comm

    comm.all_to_all_single(out, x, out_splits, in_splits, group=group, log_name=name)


class _AllToAll(torch.autograd.Function):
    """All-to-all with uneven splits; its gradient runs the exchange backwards (as ``name``_grad)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv_counts: list[int], send_counts: list[int], group, name: str):
        ctx.counts, ctx.group, ctx.name = (recv_counts, send_counts), group, name
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        _all_to_all(out, x.contiguous(), recv_counts, send_counts, group, name)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        recv_counts, send_counts = ctx.counts
        grad_x = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        _all_to_all(grad_x, grad.contiguous(), send_counts, recv_counts, ctx.group, ctx.name + "_grad")
        return grad_x, None, None, None, None


@dataclass(frozen=True)
class DispatchPlan:
    """What ``combine`` needs to return each rank's results to the tokens that asked for them."""

    token_M: torch.Tensor  # [M] local token index of every row sent, grouped by destination rank
    send_counts: list[int]  # rows sent to each rank of the group
    recv_counts: list[int]  # rows received from each rank of the group
    num_tokens: int  # S
    group: dist.ProcessGroup | None


def dispatch(
    x_SD: torch.Tensor, gates_SN: torch.Tensor, group: dist.ProcessGroup | None, ep_size: int
) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan | None]:
    """Send each token once to every rank holding one of its routed experts.

    Returns ``x_TD``, ``gates_TE`` (the gates for this rank's E experts) and the plan; with
    ep_size 1 nothing moves and the plan is None.
    """
    S, N = gates_SN.shape
    if ep_size == 1:
        return x_SD, gates_SN, None
    E = N // ep_size
    gates_SPE = gates_SN.view(S, ep_size, E)
    dest_M, token_M = (gates_SPE != 0).any(-1).t().nonzero(as_tuple=True)  # sorted by destination rank
    send = torch.bincount(dest_M, minlength=ep_size)
    recv = torch.empty_like(send)
    _all_to_all(recv, send, None, None, group, "moe_counts")
    send_counts, recv_counts = send.tolist(), recv.tolist()
    # One message per row: the token and its gates for the destination's experts.
    payload_MX = torch.cat([x_SD.index_select(0, token_M), gates_SPE[token_M, dest_M].to(x_SD.dtype)], dim=1)
    received_TX = _AllToAll.apply(payload_MX, recv_counts, send_counts, group, "moe_dispatch")
    D = x_SD.shape[1]
    plan = DispatchPlan(token_M, send_counts, recv_counts, S, group)
    return received_TX[:, :D], received_TX[:, D:], plan


def combine(y_TD: torch.Tensor, plan: DispatchPlan | None) -> torch.Tensor:
    """Return each rank's partial outputs and sum them per token -> [S, D]."""
    if plan is None:
        return y_TD
    back_MD = _AllToAll.apply(y_TD, plan.send_counts, plan.recv_counts, plan.group, "moe_combine")
    return y_TD.new_zeros((plan.num_tokens, y_TD.shape[1])).index_add_(0, plan.token_M, back_MD)


def bytes_sent(plan: DispatchPlan | None, d_model: int, num_local_experts: int, elem_size: int, rank: int) -> int:
    """Bytes this rank put on the wire for one forward (tokens out plus results back), self excluded."""
    if plan is None:
        return 0
    rows_out = sum(c for r, c in enumerate(plan.send_counts) if r != rank)
    rows_back = sum(c for r, c in enumerate(plan.recv_counts) if r != rank)
    return (rows_out * (d_model + num_local_experts) + rows_back * d_model) * elem_size
