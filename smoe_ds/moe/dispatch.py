"""Moving tokens to the ranks that hold their experts, and the results back.

Shape legend: S tokens on this rank, D d_model, N experts, P = ep_size ranks in the expert-
parallel group, E = N / P experts per rank, T tokens received, M rows sent (messages), X = D + E
payload columns. The whole legend is in ``smoe_ds.moe``.

DeepSpeed's stock layer sends a token once per chosen expert, padded to a fixed capacity.
Here a token goes at most once to each rank that holds any of its chosen experts, together
with its gates for that rank's experts; the rank sums its experts' weighted outputs and
sends one row back. Variable split sizes keep it dropless with no padding. Per layer this is
a count exchange and two all-to-alls forward, two all-to-alls backward.

**Full routes.** When k > N - E, every token has chosen at least one expert on every rank (it
chose k experts and only N - E lie elsewhere), so every token goes to every rank. If every rank
also has the same number of tokens (``same_tokens_on_every_rank``, which the trainer promises
for its fixed-shape micro-batches), every split is S and nothing needs counting: the count
exchange is skipped and the rows need no gathering by index. Two collectives can then carry it
(``FULL_ROUTE_COLLECTIVES``): the same all-to-alls with fixed splits, or an all-gather of
(token, all N gates) and a reduce-scatter of the partial outputs, whose gradients are each other.

**Weights instead of tokens** (``moe.ep_exchange = "weights"``, ``gather_experts``). The experts
can travel to the tokens instead: each rank all-gathers the group's expert weights, runs all N
experts on its own tokens, and backward reduce-scatters the experts' gradients to the ranks that
hold them. The result and every gradient are those of the token exchange (the same sums over the
same routes), at any k. Per layer and micro-batch that is one collective forward and one backward
instead of four (five while counting), and its bytes are the experts' weights whatever the k and
the batch, where the tokens' grow with both: it wins when a layer's experts are small against
the tokens of a micro-batch (``docs/expert_parallelism.md`` has the crossover). The gathered
weights stay alive from forward to backward: each rank transiently holds every expert of every
MoE layer, as without expert parallelism.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smoe_ds.moe.row_gather import gather_rows

COLLECTIVES = (
    "moe_counts",
    "moe_dispatch",
    "moe_combine",
    "moe_dispatch_grad",
    "moe_combine_grad",
    "moe_experts",
    "moe_experts_grad",
)
"""The names our collectives carry in DeepSpeed's comms logger (``smoe_ds.training.step_breakdown``)."""

FULL_ROUTE_COLLECTIVES = ("all_to_all", "gather_scatter")
"""How full routes travel: fixed-split all-to-alls, or an all-gather and a reduce-scatter."""

_same_tokens = False  # inside same_tokens_on_every_rank()


@contextlib.contextmanager
def same_tokens_on_every_rank() -> Iterator[None]:
    """Promise, for the forwards run inside, that every rank of each expert-parallel group passes
    the same number of tokens through each MoE layer, which lets full routes skip the count
    exchange. Breaking the promise makes the collectives' sizes disagree across ranks."""
    global _same_tokens
    before, _same_tokens = _same_tokens, True
    try:
        yield
    finally:
        _same_tokens = before


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


class _FullRouteExchange(torch.autograd.Function):
    """Full routes in one all-to-all: every token to every rank of the group, each with the
    destination's E gates. x_SD [S, D], gates_SN [S, N] -> x_TD [P * S, D], gates_TE [P * S, E],
    rank r's tokens in block r.

    The payload [P, S, D + E] is written once (x broadcast into every block, the gates transposed
    into place) rather than built by ``repeat`` and ``cat``; backward packs both gradients into
    one buffer and sums the P blocks' x rows, where autograd would zero-fill a full-width buffer
    per slice and add the two: 0.92-0.94x the time of that construction for one layer's dispatch
    and combine at the default job's shape (``smoe_ds.bench.packing``, which keeps it as reference).
    """

    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, gates_SN: torch.Tensor, group, ep_size: int):
        (S, D), N = x_SD.shape, gates_SN.shape[1]
        E = N // ep_size
        X = D + E
        send_PSX = x_SD.new_empty((ep_size, S, X))
        send_PSX[:, :, :D] = x_SD
        send_PSX[:, :, D:] = gates_SN.view(S, ep_size, E).transpose(0, 1)
        recv_TX = torch.empty_like(send_PSX).view(ep_size * S, X)
        _all_to_all(recv_TX, send_PSX.view(ep_size * S, X), None, None, group, "moe_dispatch")
        ctx.group, ctx.shape = group, (ep_size, S, D, E)
        return recv_TX[:, :D].contiguous(), recv_TX[:, D:].contiguous()

    @staticmethod
    def backward(ctx, grad_x_TD: torch.Tensor, grad_gates_TE: torch.Tensor):
        # Both gradients arrive as tensors (autograd materialises a missing one as zeros), so
        # every rank joins the exchange with the same sizes.
        P, S, D, E = ctx.shape
        grad_recv_TX = grad_x_TD.new_empty((P * S, D + E))
        grad_recv_TX[:, :D] = grad_x_TD
        grad_recv_TX[:, D:] = grad_gates_TE
        grad_send_PSX = torch.empty_like(grad_recv_TX).view(P, S, D + E)
        _all_to_all(grad_send_PSX.view(P * S, D + E), grad_recv_TX, None, None, ctx.group, "moe_dispatch_grad")
        grad_x_SD = grad_send_PSX[:, :, :D].sum(0)
        grad_gates_SN = grad_send_PSX[:, :, D:].transpose(0, 1).reshape(S, P * E)
        return grad_x_SD, grad_gates_SN, None, None


def _all_gather(x: torch.Tensor, group, name: str) -> torch.Tensor:
    """[S, X] on each rank -> [P * S, X], rank r's rows in block r."""
    from deepspeed import comm

    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    comm.all_gather_into_tensor(out, x.contiguous(), group=group, log_name=name)
    return out


def _reduce_scatter(y: torch.Tensor, group, name: str) -> torch.Tensor:
    """[P * S, D] on each rank -> [S, D]: the sum over ranks of this rank's block of rows."""
    from deepspeed import comm

    out = y.new_empty((y.shape[0] // dist.get_world_size(group), *y.shape[1:]))
    comm.reduce_scatter_tensor(out, y.contiguous(), group=group, log_name=name)
    return out


class _AdjointPair(torch.autograd.Function):
    """``forward_op`` on the input, its adjoint ``backward_op`` on the gradient (logged as
    ``name``_grad): all-gather and reduce-scatter (sum) are each other's adjoints."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_op, backward_op, group, name: str):
        ctx.backward_op, ctx.group, ctx.name = backward_op, group, name
        return forward_op(x, group, name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_op(grad, ctx.group, ctx.name + "_grad"), None, None, None, None


class _ExpertGather(torch.autograd.Function):
    """This rank's stacked expert tensors, each [E, ...] -> every rank's, each [P * E, ...] with
    rank r's experts in block r (global expert order), all in one all-gather of their packed rows.

    Backward packs the gradients the same way and reduce-scatters them: each rank receives, for
    its own experts, the sum over the group of every rank's gradient, which is what the token
    exchange delivers as well (the sum over every token of the group routed to that expert).
    """

    @staticmethod
    def forward(ctx, group, *w_E: torch.Tensor):
        E = w_E[0].shape[0]
        ctx.group, ctx.shapes = group, [t.shape[1:] for t in w_E]
        ctx.widths = [t[0].numel() for t in w_E]
        packed_EW = torch.cat([t.reshape(E, -1) for t in w_E], dim=1)
        gathered_GW = _all_gather(packed_EW, group, "moe_experts")  # G = P * E rows
        parts = gathered_GW.split(ctx.widths, dim=1)  # column blocks: copied out to contiguous tensors
        return tuple(part.reshape(-1, *shape).contiguous() for part, shape in zip(parts, ctx.shapes, strict=True))

    @staticmethod
    def backward(ctx, *grad_G: torch.Tensor):
        # autograd materialises the gradient of an unused output as zeros, so every rank sends
        # the same sizes
        packed_GW = torch.cat([g.reshape(g.shape[0], -1) for g in grad_G], dim=1)
        mine_EW = _reduce_scatter(packed_GW, ctx.group, "moe_experts_grad")
        parts = mine_EW.split(ctx.widths, dim=1)
        return (None, *(part.reshape(-1, *shape).contiguous() for part, shape in zip(parts, ctx.shapes, strict=True)))


def _gather_experts_traceable(group, *w_E: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``_ExpertGather`` as ``torch.compile`` can trace it: the same packed all-gather, by torch's
    functional collective, whose gradient is the reduce-scatter (sum). DeepSpeed's ``comm``
    wrappers around the collective (timers, the comms logger) are Python the compiler cannot
    follow, so inside a compiled graph this exchange is not in DeepSpeed's comms log."""
    from torch.distributed import _functional_collectives as funcol

    E = w_E[0].shape[0]
    packed_EW = torch.cat([t.reshape(E, -1) for t in w_E], dim=1)
    gathered_GW = funcol.all_gather_single_autograd(packed_EW, 0, group)
    parts = gathered_GW.split([t[0].numel() for t in w_E], dim=1)
    return tuple(part.reshape(-1, *t.shape[1:]).contiguous() for part, t in zip(parts, w_E, strict=True))


def gather_experts(stacked: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """This rank's stacked expert tensors by name (``w_in`` [E, H, D], ...) -> every rank's of the
    expert-parallel ``group``, [P * E, ...] in global expert order; differentiable (their gradients
    are reduce-scattered back), one collective each way. The sizes are the weights', whatever the
    tokens: nothing is counted or read back."""
    gather = _gather_experts_traceable if torch.compiler.is_compiling() else _ExpertGather.apply
    return dict(zip(stacked, gather(group, *stacked.values()), strict=True))


@dataclass(frozen=True)
class DispatchPlan:
    """What ``combine`` needs to return each rank's results to the tokens that asked for them.

    Counted routes give each token Y = min(k, P) slots, one per rank it can reach (a token's k
    experts lie on at most that many ranks): ``slot_M`` is the slot (token * Y + its j-th rank)
    of every row sent, ``row_of_slot`` [S * Y] the row of each slot (M where the token reached
    fewer ranks). The results come back by gathering with the second and summing each token's Y
    slots: a fixed order, no atomics.
    """

    token_M: torch.Tensor | None  # [M] local token of every row sent, by destination; None: full routes
    send_counts: list[int]  # rows sent to each rank of the group
    recv_counts: list[int]  # rows received from each rank of the group
    num_tokens: int  # S
    group: dist.ProcessGroup | None
    gate_columns: int  # gates sent with each row: E, or all N when gathered
    gathered: bool = False  # full routes by all-gather and reduce-scatter
    slot_M: torch.Tensor | None = None  # [M] counted routes only
    row_of_slot: torch.Tensor | None = None  # [S * Y] counted routes only
    slots_per_token: int = 1  # Y


def full_routes(k: int, num_experts: int, ep_size: int) -> bool:
    """Whether every token goes to every rank and the splits are known without counting: k > N - E
    inside ``same_tokens_on_every_rank()``. The same answer on every rank (k is the same)."""
    return _same_tokens and ep_size > 1 and k > num_experts - num_experts // ep_size


def dispatch(
    x_SD: torch.Tensor,
    gates_SN: torch.Tensor,
    group: dist.ProcessGroup | None,
    ep_size: int,
    full_route: str | None = None,
    k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan | None]:
    """Send each token once to every rank holding one of its routed experts.

    Returns ``x_TD``, ``gates_TE`` (the gates for this rank's E experts) and the plan; with
    ep_size 1 nothing moves and the plan is None. ``full_route`` (one of ``FULL_ROUTE_COLLECTIVES``,
    only where ``full_routes`` holds) sends every token everywhere with that collective, uncounted.
    ``k`` (the routes per token; default N) bounds the ranks one token reaches.

    Counted routes read the device back once per forward: ``all_to_all_single`` takes its split
    sizes, and so the size of what it receives, as host integers, and those depend on the routes.
    """
    S, N = gates_SN.shape
    if ep_size == 1:
        return x_SD, gates_SN, None
    E, D = N // ep_size, x_SD.shape[1]
    gates_SPE = gates_SN.view(S, ep_size, E)
    if full_route == "gather_scatter":
        payload_SX = torch.cat([x_SD, gates_SN.to(x_SD.dtype)], dim=1)  # every rank takes its own E gates
        gathered_TX = _AdjointPair.apply(payload_SX, _all_gather, _reduce_scatter, group, "moe_dispatch")
        first = D + dist.get_rank(group) * E
        plan = DispatchPlan(None, [S] * ep_size, [S] * ep_size, S, group, N, gathered=True)
        return gathered_TX[:, :D], gathered_TX[:, first : first + E], plan
    if full_route == "all_to_all":
        x_TD, gates_TE = _FullRouteExchange.apply(x_SD, gates_SN.to(x_SD.dtype), group, ep_size)
        return x_TD, gates_TE, DispatchPlan(None, [S] * ep_size, [S] * ep_size, S, group, E)
    if full_route is not None:
        raise ValueError(f"full_route must be one of {FULL_ROUTE_COLLECTIVES} or None, got {full_route!r}")
    reach_PS = (gates_SPE != 0).any(-1).t()  # does token s go to rank p
    send = reach_PS.sum(1)
    recv = torch.empty_like(send)
    _all_to_all(recv, send, None, None, group, "moe_counts")
    send_counts, recv_counts = torch.stack([send, recv]).tolist()  # the exchange's one read-back
    dest_M, token_M, slot_M, row_of_slot, Y = _counted_slots(reach_PS, sum(send_counts), k or N)
    # One message per row: the token and its gates for the destination's experts.
    x_MD = gather_rows(x_SD, slot_M, row_of_slot, fold=Y)
    payload_MX = torch.cat([x_MD, gates_SPE[token_M, dest_M].to(x_SD.dtype)], dim=1)
    received_TX = _AllToAll.apply(payload_MX, recv_counts, send_counts, group, "moe_dispatch")
    plan = DispatchPlan(token_M, send_counts, recv_counts, S, group, E, False, slot_M, row_of_slot, Y)
    return received_TX[:, :D], received_TX[:, D:], plan


def _counted_slots(reach_PS: torch.Tensor, rows: int, k: int):
    """The rows to send, in destination order, from the [P, S] mask of (rank, token) pairs that
    ``rows`` of them hold, without ``nonzero``: dest_M, token_M, slot_M, row_of_slot and Y (see
    ``DispatchPlan``)."""
    P, S = reach_PS.shape
    Y = min(k, P)
    reach = reach_PS.reshape(-1)
    # Each reached pair's row is the count of reached pairs before it; the others all land in one
    # spare entry past the end, which is dropped.
    row = torch.where(reach, torch.cumsum(reach, 0) - 1, rows)
    pairs = torch.arange(P * S, device=reach.device)
    pair_M = torch.empty(rows + 1, dtype=torch.long, device=reach.device).scatter_(0, row, pairs)[:rows]
    dest_M, token_M = pair_M // S, pair_M % S
    nth_rank_PS = torch.cumsum(reach_PS, 0) - 1  # the j-th rank this token reaches, for each reached rank
    slot_M = token_M * Y + nth_rank_PS.reshape(-1)[pair_M]
    row_of_slot = torch.full((S * Y,), rows, dtype=torch.long, device=reach.device)
    row_of_slot.scatter_(0, slot_M, torch.arange(rows, device=reach.device))
    return dest_M, token_M, slot_M, row_of_slot, Y


def combine(y_TD: torch.Tensor, plan: DispatchPlan | None) -> torch.Tensor:
    """Return each rank's partial outputs and sum them per token -> [S, D]."""
    if plan is None:
        return y_TD
    if plan.gathered:
        return _AdjointPair.apply(y_TD, _reduce_scatter, _all_gather, plan.group, "moe_combine")
    back_MD = _AllToAll.apply(y_TD, plan.send_counts, plan.recv_counts, plan.group, "moe_combine")
    if plan.token_M is None:  # full routes: rank r's block of S rows answers all S tokens
        return back_MD.view(len(plan.send_counts), plan.num_tokens, -1).sum(0)
    back_SYD = gather_rows(back_MD, plan.row_of_slot, plan.slot_M).view(plan.num_tokens, plan.slots_per_token, -1)
    return back_SYD.sum(1)  # each token's partial results, in a fixed order


def ranks_reached(k: int, num_experts: int, ep_size: int) -> float:
    """Expected ranks of an expert-parallel group that one token reaches when its k experts are
    uniformly random (the frozen random router's expectation): P (1 - C(N - E, k) / C(N, k))."""
    E = num_experts // ep_size
    return ep_size * (1 - math.comb(num_experts - E, k) / math.comb(num_experts, k))


def exchange_elements(tokens: int, d_model: int, num_experts: int, d_expert: int, ep_size: int, k: int) -> dict:
    """Elements one rank sends per MoE layer and micro-batch, forward and backward, for each
    ``moe.ep_exchange`` (times the element size for bytes): ``tokens`` routed at k, or the built-in
    experts' weights (2 x d_model x d_expert each). The formulas of ``docs/expert_parallelism.md``."""
    P, N, D = ep_size, num_experts, d_model
    share = (P - 1) / P  # of what a rank moves, the part that leaves it
    return {
        "tokens": tokens * 2 * ranks_reached(k, N, P) * share * (2 * D + N // P),
        "weights": 2 * share * N * 2 * D * d_expert,
    }


def weights_bytes_sent(stacked: dict[str, torch.Tensor], ep_size: int) -> int:
    """Bytes this rank puts on the wire for one forward of the weights exchange: its E experts'
    stacked tensors to each of the other P - 1 ranks (backward returns as many as gradients)."""
    return (ep_size - 1) * sum(t.numel() * t.element_size() for t in stacked.values())


def tokens_bytes_sent(plan: DispatchPlan | None, d_model: int, elem_size: int, rank: int) -> int:
    """Bytes this rank put on the wire for one forward (tokens out plus results back), self excluded."""
    if plan is None:
        return 0
    rows_out = sum(c for r, c in enumerate(plan.send_counts) if r != rank)
    rows_back = sum(c for r, c in enumerate(plan.recv_counts) if r != rank)
    return (rows_out * (d_model + plan.gate_columns) + rows_back * d_model) * elem_size
