"""Feed-forward networks: one FFN (the dense baseline, DeepSpeed's stock experts) and the
stacked experts of the fast SMoE-Dropout layer.

The stacked experts also hold slices of pretrained FFNs (``smoe_ds.hf``): optionally with
in-projection biases, another activation, or a SwiGLU gate projection.

Shape legend: T tokens reaching this rank's experts, D d_model, E local experts, H expert
width, R routes (token, expert pairs) with a non-zero gate.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smoe_ds.moe.cpu_experts import dense_gelu_experts, load_op, sparse_gelu_experts
from smoe_ds.moe.dispatch import gather_experts
from smoe_ds.moe.gated_gelu import gated_gelu


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


# The compute path is a documented rule, not a flag: the dense-masked path (every expert on
# every token, zero gates included) once the share of non-zero gates reaches a threshold, the
# sparse path (only the routed pairs) below it. The thresholds are where the two paths' measured
# fwd+bwd times cross with the compiled CPU ops (`python -m smoe_ds.bench.layer` at k near N; the
# figures are in the README's Performance section): near k/N = 0.8 for narrow experts (H <= D),
# and above 15/16 for wide ones, whose dense-masked path runs a GEMM pair per expert (see
# ``forward_dense``). Re-measure them when either path changes. GPUs have their own threshold:
# there the dense-masked path is one concatenated GEMM pair for every width, and the sparse path
# pays a fixed cost per layer (host syncs for the route counts, a dozen small kernels) that a
# dense FFN does not (`make gpu-check`, bench_paths.json; the README's GPU section).
DENSE_PATH_MIN_DENSITY_NARROW = 0.8
DENSE_PATH_MIN_DENSITY_WIDE = 0.95
DENSE_PATH_MIN_DENSITY_GPU = 0.5


_GROUPED_MM_FAILED: set = set()  # (device type, dtype) pairs whose backend refused torch._grouped_mm


def grouped_mm_applies(x_RA: torch.Tensor, w_EAB: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: its kernels want every row and start
    address 16-byte aligned (on the GPU and the CPU alike), so A and B must be multiples of
    16 bytes' worth of elements. Checked up front rather than caught: an expert's two GEMMs
    share A and B, so both take the same path, and a first GEMM that ran grouped before a
    second one fell back would fail in backward."""
    if not hasattr(torch, "_grouped_mm") or (x_RA.device.type, x_RA.dtype) in _GROUPED_MM_FAILED:
        return False
    align = 16 // x_RA.element_size()
    rows_aligned = all(n % align == 0 for n in (x_RA.shape[1], w_EAB.shape[1], w_EAB.shape[2]))
    return rows_aligned and x_RA.data_ptr() % 16 == 0 and w_EAB.data_ptr() % 16 == 0


def grouped_matmul(x_RA: torch.Tensor, w_EAB: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x_RA``, sorted by expert with ``counts[e]`` rows for expert e, times w_EAB[e] -> [R, B]."""
    if grouped_mm_applies(x_RA, w_EAB):
        try:
            offs = torch.tensor(counts, device=x_RA.device).cumsum(0).to(torch.int32)
            return torch._grouped_mm(x_RA, w_EAB, offs=offs)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:  # a backend without kernels for this dtype
            _GROUPED_MM_FAILED.add((x_RA.device.type, x_RA.dtype))
            warnings.warn(
                f"torch._grouped_mm refused {x_RA.dtype} on {x_RA.device.type} ({str(e).splitlines()[0]}); "
                "the experts run one GEMM each there instead",
                stacklevel=2,
            )
    parts = [xe @ w_EAB[e] for e, xe in enumerate(x_RA.split(counts))]
    return torch.cat(parts)


class GroupedExperts(nn.Module):
    """E experts held as stacked weights, so they run as grouped or concatenated GEMMs.

    ``w_in`` [E, H, D] holds each expert's ``nn.Linear(D, H).weight`` and ``w_out`` [E, H, D]
    the transpose of each ``nn.Linear(H, D).weight``; both layouts make the dense path's
    concatenated matrices free views. The state dict is written and read in the per-expert
    layout of ``FeedForward`` under ``deepspeed_experts.{e}``, which is what DeepSpeed's
    checkpointing splits into one file per global expert.

    Expert e computes ``act(x w_in[e]^T + b_in[e]) @ w_out[e]``, or with ``gated=True`` the
    SwiGLU form ``(act(x w_gate[e]^T) * (x w_in[e]^T)) @ w_out[e]``. ``b_in`` [E, H] exists
    with ``bias=True`` (plain experts only); an output bias belongs to the whole FFN, not to
    an expert, so it is not here. The defaults (GELU, no bias, not gated) are the built-in LM's.
    """

    def __init__(
        self,
        num_local_experts: int,
        d_model: int,
        d_hidden: int,
        group_name: str,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
        bias: bool = False,
        gated: bool = False,
    ) -> None:
        super().__init__()
        if bias and gated:
            raise ValueError("gated experts with biases are not supported")
        self.num_local_experts, self.d_model, self.d_hidden = num_local_experts, d_model, d_hidden
        self.activation = activation
        bound = 1.0 / math.sqrt(d_model)
        shape = (num_local_experts, d_hidden, d_model)
        self.w_in = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.w_out = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.b_in = nn.Parameter(torch.zeros(num_local_experts, d_hidden)) if bias else None
        self.w_gate = nn.Parameter(torch.empty(shape).uniform_(-bound, bound)) if gated else None
        for p in self.parameters():
            # What DeepSpeed's Experts wrapper marks: reduce over the expert-data-parallel group only.
            p.allreduce = False
            p.group_name = group_name
        self._layout_hooks = [
            self.register_state_dict_post_hook(_to_per_expert_state),
            self.register_load_state_dict_pre_hook(stack_per_expert_state),
        ]

    def use_stacked_state_dict(self) -> None:
        """Save and load the stacked tensors as they are (single-file exports)."""
        for handle in self._layout_hooks:
            handle.remove()
        self._layout_hooks = []

    def forward(self, x_TD: torch.Tensor, gates_TE: torch.Tensor, gather_group=None) -> torch.Tensor:
        """sum_e gates_TE[t, e] * expert_e(x_TD[t]) -> [T, D]; zero gates cost nothing on the sparse path.

        With ``gather_group`` (an expert-parallel group of P ranks) the experts of every rank of
        the group are gathered first and ``gates_TE`` holds gates for all P * E of them, in
        global order; their gradients return to the ranks that hold them (the "weights" exchange
        of ``smoe_ds.moe.dispatch``). Gathered here, inside the module's own forward, because
        ZeRO-3 gathers a module's partitioned parameters only around that forward.
        """
        w = self._stacked() if gather_group is None else gather_experts(self._stacked(), gather_group)
        density = float((gates_TE != 0).sum()) / max(gates_TE.numel(), 1)
        if density >= self.dense_path_min_density(x_TD.device):
            return self.forward_dense(x_TD, gates_TE, w=w)
        return self.forward_sparse(x_TD, gates_TE, w=w)

    def dense_path_min_density(self, device: torch.device) -> float:
        """The share of non-zero gates from which ``forward`` takes the dense-masked path on ``device``."""
        if device.type != "cpu":
            return DENSE_PATH_MIN_DENSITY_GPU
        return DENSE_PATH_MIN_DENSITY_NARROW if self.concatenates(device) else DENSE_PATH_MIN_DENSITY_WIDE

    def concatenates(self, device: torch.device) -> bool:
        """Whether the dense-masked path runs all experts as one concatenated GEMM pair (see ``forward_dense``)."""
        return self.d_hidden <= self.d_model or device.type != "cpu"

    def _hidden(
        self, project: Callable[[torch.Tensor], torch.Tensor], w: dict, b_in: torch.Tensor | None
    ) -> torch.Tensor:
        """The hidden units, given ``project(weight)``: the inputs times the matching rows of a
        stacked [E, H, D] weight; ``w`` holds ``w_in`` (and ``w_gate`` when gated) and ``b_in``
        is the matching bias rows (None without biases)."""
        pre = self._pre_activation(project, w, b_in)
        if w.get("w_gate") is None:
            return self.activation(pre)
        return self.activation(project(w["w_gate"])) * pre

    @staticmethod
    def _pre_activation(project: Callable[[torch.Tensor], torch.Tensor], w: dict, b_in: torch.Tensor | None):
        """``project(w_in)`` plus the bias rows ``b_in`` when there are any."""
        pre = project(w["w_in"])
        return pre if b_in is None else pre + b_in

    def _stacked(self) -> dict[str, torch.Tensor]:
        """The stacked parameters this module has, by name."""
        return {name: getattr(self, name) for name in _PER_EXPERT_NAMES if getattr(self, name) is not None}

    def forward_dense(self, x_TD: torch.Tensor, gates_TE: torch.Tensor, *, w: dict | None = None) -> torch.Tensor:
        """Every expert on every token, weighted by the gates (zero gates included): no dispatch.
        ``w``: the stacked weights to run (gathered ones; default this module's own).

        Narrow experts (H <= D), and every width on a GPU: one GEMM over the concatenated
        experts, each expert's H hidden units scaled by its gate; the built-in experts run it on
        the CPU as a compiled op, in token blocks that stay in cache. Wide experts (H > D) on the
        CPU: one GEMM pair per expert over all tokens, scaling the D-wide outputs, which is less
        memory traffic than the hidden units. Not on a GPU, where that loop's small GEMM pairs
        are launch-bound and the concatenated pair is one large GEMM each. The measurements
        behind each choice: docs/performance.md, "Measurements behind the code's choices".
        """
        w = self._stacked() if w is None else w
        T, E, H = x_TD.shape[0], w["w_in"].shape[0], self.d_hidden
        if H <= self.d_model and self._compiled_op_applies(x_TD):
            return dense_gelu_experts(x_TD, w["w_in"], w["w_out"], gates_TE)
        gates_TE = gates_TE.to(x_TD.dtype)
        b = w.get("b_in")
        if self.concatenates(x_TD.device):
            project = lambda m: x_TD @ m.view(E * H, -1).t()  # noqa: E731
            b_in = None if b is None else b.view(E * H)
            if self.activation is F.gelu and self.w_gate is None:  # the built-in LM's experts: fused
                h_TEH = gated_gelu(self._pre_activation(project, w, b_in).view(T, E, H), gates_TE.unsqueeze(-1))
            else:
                h_TEH = self._hidden(project, w, b_in).view(T, E, H) * gates_TE.unsqueeze(-1)
            return h_TEH.view(T, E * H) @ w["w_out"].view(E * H, -1)
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):
            h_TH = self._hidden(lambda m: x_TD @ m[e].t(), w, None if b is None else b[e])  # noqa: B023 (used at once)
            y_TD = y_TD + gates_TE[:, e : e + 1] * (h_TH @ w["w_out"][e])
        return y_TD

    def forward_sparse(self, x_TD: torch.Tensor, gates_TE: torch.Tensor, *, w: dict | None = None) -> torch.Tensor:
        """Only the routed (token, expert) pairs: the compiled CPU op for the built-in experts
        (GELU, no biases, not gated) where it is built, else grouped GEMMs. ``w`` as in ``forward_dense``."""
        w = self._stacked() if w is None else w
        if self._compiled_op_applies(x_TD):
            _, token_R, gate_R, counts = self._routes(x_TD, gates_TE)
            return sparse_gelu_experts(x_TD, w["w_in"], w["w_out"], gate_R, token_R, counts)
        return self.forward_grouped(x_TD, gates_TE, w=w)

    def _routes(self, x_TD: torch.Tensor, gates_TE: torch.Tensor):
        """The non-zero gates as routes sorted by expert: expert_R, token_R, gate_R (in x's dtype)
        and the routes per expert ``counts`` [E] (E: gates_TE's columns)."""
        expert_R, token_R = gates_TE.t().nonzero(as_tuple=True)  # row-major over [E, T]: sorted by expert
        counts = torch.bincount(expert_R, minlength=gates_TE.shape[1])
        return expert_R, token_R, gates_TE[token_R, expert_R].to(x_TD.dtype), counts

    def _compiled_op_applies(self, x_TD: torch.Tensor) -> bool:
        built_in = self.activation is F.gelu and self.b_in is None and self.w_gate is None
        same_dtype = x_TD.dtype == self.w_in.dtype
        return x_TD.device.type == "cpu" and built_in and same_dtype and load_op() is not None

    def forward_grouped(self, x_TD: torch.Tensor, gates_TE: torch.Tensor, *, w: dict | None = None) -> torch.Tensor:
        """Sort the routes by expert, run grouped GEMMs, add the weighted rows back per token.

        The experts run in consecutive groups whose route buffers stay under
        ``route_buffer_limit`` (one group on GPUs; see ``CPU_ROUTE_BUFFER_BYTES``). ``w`` as in
        ``forward_dense``.
        """
        expert_R, token_R, gate_R, counts_E = self._routes(x_TD, gates_TE)
        counts = counts_E.tolist()
        row_bytes = max(self.d_model, self.d_hidden) * x_TD.element_size()
        groups = expert_groups(counts, route_buffer_limit(x_TD.device) // row_bytes)
        sizes = [len(g) for g in groups]
        routes = [sum(g) for g in groups]
        weight_parts = {name: p.split(sizes) for name, p in (self._stacked() if w is None else w).items()}
        y_TD, first_expert = torch.zeros_like(x_TD), 0
        for i, (token_G, gate_G, expert_G) in enumerate(zip(*(t.split(routes) for t in (token_R, gate_R, expert_R)))):
            w_G = {name: parts[i] for name, parts in weight_parts.items()}
            y_GD = self._routed_rows(x_TD.index_select(0, token_G), gate_G, expert_G - first_expert, w_G, groups[i])
            y_TD.index_add_(0, token_G, y_GD)  # in place: no copy of y_TD per group
            first_expert += sizes[i]
        return y_TD

    def _routed_rows(self, x_RD, gate_R, expert_R, w: dict, counts: list[int]) -> torch.Tensor:
        """Routes x_RD [R, D], sorted by expert with ``counts[e]`` rows for expert e of the stacked
        weights ``w`` (and ``expert_R`` [R] naming it), through their experts, times their gates -> [R, D]."""
        b_in = None if w.get("b_in") is None else w["b_in"].index_select(0, expert_R)
        h_RH = self._hidden(lambda m: grouped_matmul(x_RD, m.transpose(1, 2), counts), w, b_in)
        # The gate scales a row of the second GEMM's input or of its output: the same result, so
        # scale the narrower of the two.
        if self.d_hidden <= self.d_model:
            return grouped_matmul(h_RH * gate_R.unsqueeze(-1), w["w_out"], counts)
        return grouped_matmul(h_RH, w["w_out"], counts) * gate_R.unsqueeze(-1)


# On the CPU, glibc serves every block over 32 MiB with a fresh mmap (and smaller ones too after
# it trims its heap, the more often the bigger they are), and the page faults of filling a fresh
# block can cost more than the GEMMs that use it. So the sparse path runs the experts in groups
# whose route buffers stay under this size: big enough that per-group overhead stays small,
# small enough to be reused from the heap. 8 MiB measured best against 1, 2, 16 and 32 MiB
# (`python -m smoe_ds.bench.layer`, shape B; the README's Performance section explains the effect).
# GPU caching allocators have no such cliff, and there one group keeps the grouped GEMM one kernel.
CPU_ROUTE_BUFFER_BYTES = 8 << 20


def route_buffer_limit(device: torch.device) -> int:
    """Largest route buffer (bytes) one expert group may fill on ``device``."""
    return CPU_ROUTE_BUFFER_BYTES if device.type == "cpu" else 1 << 62


def expert_groups(counts: list[int], max_rows: int) -> list[list[int]]:
    """Split per-expert route counts into consecutive groups of at most ``max_rows`` routes
    (an expert with more routes than that forms a group alone) -> each group's counts."""
    groups: list[list[int]] = [[]]
    for c in counts:
        if groups[-1] and sum(groups[-1]) + c > max_rows:
            groups.append([])
        groups[-1].append(c)
    return groups


# -- the checkpoint layout of experts ------------------------------------------------------------
#
# Checkpoints and exports hold experts one by one, as DeepSpeed's own ``Experts`` would: expert e
# of a layer's ``GroupedExperts`` at ``{prefix}deepspeed_experts.{e}.{name}``, each tensor in
# ``nn.Linear`` layout, with e the *global* expert id wherever more than one rank's experts meet
# (checkpoint files, exports, ZeRO shards gathered). These functions are the one place that
# layout is spelled out.

# Stacked parameter -> (its name in the per-expert ``FeedForward``-style layout, transposed there?)
_PER_EXPERT_NAMES = {
    "w_in": ("w_in.weight", False),
    "w_out": ("w_out.weight", True),
    "b_in": ("w_in.bias", False),
    "w_gate": ("w_gate.weight", False),
}
_EXPERT_ID = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


def per_expert_key(prefix: str, expert_id: int, stacked: str) -> str:
    """The key of expert ``expert_id``'s share of stacked parameter ``stacked`` ("w_in", ...)."""
    return f"{prefix}deepspeed_experts.{expert_id}.{_PER_EXPERT_NAMES[stacked][0]}"


def is_stacked_expert_param(name: str) -> bool:
    """Whether a module parameter name is a stacked expert tensor of ``GroupedExperts``."""
    return name.rsplit(".", 1)[-1] in _PER_EXPERT_NAMES and ".experts." in name


def _split_name(name: str) -> tuple[str, str]:
    """``"blocks.0.ffn.deepspeed_moe.experts.w_in"`` -> (``"blocks.0.ffn.deepspeed_moe.experts."``, ``"w_in"``)."""
    stacked = name.rsplit(".", 1)[-1]
    return name[: len(name) - len(stacked)], stacked


def split_stacked(name: str, tensor_E: torch.Tensor, first_expert: int) -> dict[str, torch.Tensor]:
    """A stacked parameter ``{prefix}{stacked}`` [E, ...] -> its E per-expert entries, numbered
    ``first_expert``, ``first_expert + 1``, ... (a rank's global ids), in ``nn.Linear`` layout."""
    prefix, stacked = _split_name(name)
    transposed = _PER_EXPERT_NAMES[stacked][1]
    return {
        per_expert_key(prefix, first_expert + e, stacked): (t.t() if transposed else t)
        for e, t in enumerate(tensor_E.unbind(0))
    }


def stack_experts(state: dict[str, torch.Tensor], name: str, expert_ids: range, pop: bool = False) -> torch.Tensor:
    """The inverse of ``split_stacked``: stacked parameter ``name`` [E, ...] from the per-expert
    entries of ``expert_ids`` in ``state`` (removed from it with ``pop``)."""
    prefix, stacked = _split_name(name)
    take = state.pop if pop else state.__getitem__
    parts = [take(per_expert_key(prefix, e, stacked)) for e in expert_ids]
    return torch.stack([p.t() for p in parts] if _PER_EXPERT_NAMES[stacked][1] else parts)


def global_expert_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """Rewrite a local expert id in a per-expert key to its global id (other names pass unchanged)."""
    return _EXPERT_ID.sub(lambda m: f"{m[1]}{ep_rank * num_local_experts + int(m[2])}{m[3]}", name)


def _to_per_expert_state(module: GroupedExperts, state: dict, prefix: str, local_metadata) -> None:
    for stacked in _PER_EXPERT_NAMES:
        if prefix + stacked in state:  # b_in / w_gate exist only for some experts
            state.update(split_stacked(prefix + stacked, state.pop(prefix + stacked), first_expert=0))


def stack_per_expert_state(module: GroupedExperts, state: dict, prefix: str, *args) -> None:
    """Turn ``module``'s per-expert entries in ``state`` (local ids 0..E-1) into its stacked
    parameters, in place; a load_state_dict pre-hook, and what exports call on a full state."""
    present = [s for s in _PER_EXPERT_NAMES if getattr(module, s) is not None]
    ids = range(module.num_local_experts)
    if prefix + "w_in" in state or not all(per_expert_key(prefix, e, s) in state for s in present for e in ids):
        return  # stacked already, or incomplete: load_state_dict reports the missing keys itself
    for stacked in present:
        state[prefix + stacked] = stack_experts(state, prefix + stacked, ids, pop=True)
