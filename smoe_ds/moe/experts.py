"""Feed-forward networks: one FFN (the dense baseline, DeepSpeed's stock experts) and the
stacked experts of the fast SMoE-Dropout layer.

The stacked experts also hold slices of pretrained FFNs (``smoe_ds.hf``): optionally with
in-projection biases, another activation, or a SwiGLU gate projection.

Shape legend: T tokens reaching this rank's experts, D d_model, E local experts, H expert
width, K routes per token, R = T x K routes, Q rows of the padded route buffer (``smoe_ds.moe.routes``).
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
from smoe_ds.moe.routes import Routes, group_alignment, grouped_layout
from smoe_ds.moe.row_gather import gather_rows


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


# The compute path is a documented rule, not a flag: the dense-masked path (every expert on every
# token, zero gates included) once the share of (token, expert) pairs routed reaches a threshold,
# the sparse path (only the routes) below it. That share is k / N, which the host knows from the
# schedule (``Routes.density``): the choice never reads the data back. The thresholds are where the
# two paths' measured fwd+bwd times cross with the compiled CPU ops (`python -m smoe_ds.bench.layer`
# at k near N; the figures are in docs/performance.md): near k/N = 0.8 for narrow experts (H <= D),
# and above 15/16 for wide ones, whose dense-masked path runs a GEMM pair per expert (see
# ``forward_dense``). Re-measure them when either path changes. GPUs have their own threshold: there
# the dense-masked path is one concatenated GEMM pair for every width (`make gpu-check`,
# bench_paths.json; docs/results/gpu_check).
DENSE_PATH_MIN_DENSITY_NARROW = 0.8
DENSE_PATH_MIN_DENSITY_WIDE = 0.95
DENSE_PATH_MIN_DENSITY_GPU = 0.5


_GROUPED_MM_FAILED: set = set()  # (device type, dtype) pairs whose backend refused torch._grouped_mm


def grouped_mm_applies(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether ``torch._grouped_mm`` takes rows in ``x``'s dtype times each stacked [E, A, B]
    weight: its kernels want every row and start address 16-byte aligned (on the GPU and the
    CPU alike), so A and B must be multiples of 16 bytes' worth of elements; the row buffers are
    fresh allocations, aligned. Decided once for an expert's GEMMs: a first GEMM that ran grouped
    before a second one fell back would fail in backward. Under ``torch.compile`` only bf16
    qualifies (what the op's shape function accepts) and addresses are not known until the
    graph runs."""
    if not hasattr(torch, "_grouped_mm") or (x.device.type, x.dtype) in _GROUPED_MM_FAILED:
        return False
    align = 16 // x.element_size()
    widths_aligned = all(n % align == 0 for w in weights for n in w.shape[1:])
    if torch.compiler.is_compiling():
        return widths_aligned and x.dtype == torch.bfloat16
    return widths_aligned and all(w.data_ptr() % 16 == 0 for w in weights)


def grouped_matmul(x_QA: torch.Tensor, w_EAB: torch.Tensor, offs_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows of ``x_QA``, in consecutive groups per expert ending at ``offs_E`` [E] (int32, on the
    device), times w_EAB[e] -> [Q, B]. ``grouped``: by ``torch._grouped_mm``, which takes ``offs``
    on the device; else (widths or dtypes it does not take) one GEMM per expert, which needs the
    group sizes on the host and so reads them back."""
    if grouped:
        try:
            return torch._grouped_mm(x_QA, w_EAB, offs=offs_E)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:  # a backend without kernels for this dtype
            _GROUPED_MM_FAILED.add((x_QA.device.type, x_QA.dtype))
            warnings.warn(
                f"torch._grouped_mm refused {x_QA.dtype} on {x_QA.device.type} ({str(e).splitlines()[0]}); "
                "the experts run one GEMM each there instead",
                stacklevel=2,
            )
    counts = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).tolist()
    return torch.cat([xe @ w_EAB[e] for e, xe in enumerate(x_QA.split(counts))])


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

    def forward(self, x_TD: torch.Tensor, routes: Routes, gather_group=None) -> torch.Tensor:
        """sum over each token's routes of gate * expert(x_TD[t]) -> [T, D], for ``routes`` over this
        module's E experts; the path follows ``routes.density`` (k / N), never the data.

        With ``gather_group`` (an expert-parallel group of P ranks) the experts of every rank of
        the group are gathered first and ``routes`` name all P * E of them, in global order; their
        gradients return to the ranks that hold them (the "weights" exchange of
        ``smoe_ds.moe.dispatch``). Gathered here, inside the module's own forward, because ZeRO-3
        gathers a module's partitioned parameters only around that forward.
        """
        w = self._stacked() if gather_group is None else gather_experts(self._stacked(), gather_group)
        if routes.density >= self.dense_path_min_density(x_TD.device):
            return self.forward_dense(x_TD, routes, w=w)
        return self.forward_sparse(x_TD, routes, w=w)

    def dense_path_min_density(self, device: torch.device) -> float:
        """The share of routed (token, expert) pairs from which ``forward`` takes the dense-masked path."""
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

    def _gated_hidden(self, project, w: dict, b_in: torch.Tensor | None, gate: torch.Tensor, shape) -> torch.Tensor:
        """``_hidden`` viewed as ``shape`` and times ``gate`` (broadcast over H): for the built-in
        GELU in one fused elementwise pass (``gated_gelu``), so the gate costs no pass of its own."""
        if self.activation is F.gelu and w.get("w_gate") is None:
            return gated_gelu(self._pre_activation(project, w, b_in).view(shape), gate)
        return self._hidden(project, w, b_in).view(shape) * gate

    @staticmethod
    def _pre_activation(project: Callable[[torch.Tensor], torch.Tensor], w: dict, b_in: torch.Tensor | None):
        """``project(w_in)`` plus the bias rows ``b_in`` when there are any."""
        pre = project(w["w_in"])
        return pre if b_in is None else pre + b_in

    def _stacked(self) -> dict[str, torch.Tensor]:
        """The stacked parameters this module has, by name."""
        return {name: getattr(self, name) for name in _PER_EXPERT_NAMES if getattr(self, name) is not None}

    def forward_dense(self, x_TD: torch.Tensor, routes: Routes, *, w: dict | None = None) -> torch.Tensor:
        """Every expert on every token, weighted by the gates (zero gates included): no dispatch.
        ``w``: the stacked weights to run (gathered ones; default this module's own).

        Narrow experts (H <= D), and every width on a GPU: one GEMM over the concatenated
        experts, each expert's H hidden units scaled by its gate inside the activation; the
        built-in experts run it on the CPU as a compiled op, in token blocks that stay in cache.
        Wide experts (H > D) on the CPU: one GEMM pair per expert over all tokens, scaling the
        D-wide outputs, which is less memory traffic than the hidden units. Not on a GPU, where
        that loop's small GEMM pairs are launch-bound and the concatenated pair is one large GEMM
        each. The measurements behind each choice: docs/performance.md, "Measurements behind the
        code's choices".
        """
        w = self._stacked() if w is None else w
        T, E, H = x_TD.shape[0], w["w_in"].shape[0], self.d_hidden
        gates_TE = routes.dense()
        if H <= self.d_model and self._compiled_op_applies(x_TD):
            return dense_gelu_experts(x_TD, w["w_in"], w["w_out"], gates_TE)
        gates_TE = gates_TE.to(x_TD.dtype)
        b = w.get("b_in")
        if self.concatenates(x_TD.device):
            project = lambda m: x_TD @ m.view(E * H, -1).t()  # noqa: E731
            b_in = None if b is None else b.view(E * H)
            h_TEH = self._gated_hidden(project, w, b_in, gates_TE.unsqueeze(-1), (T, E, H))
            return h_TEH.view(T, E * H) @ w["w_out"].view(E * H, -1)
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):
            h_TH = self._hidden(lambda m: x_TD @ m[e].t(), w, None if b is None else b[e])  # noqa: B023 (used at once)
            y_TD = y_TD + gates_TE[:, e : e + 1] * (h_TH @ w["w_out"][e])
        return y_TD

    def forward_sparse(self, x_TD: torch.Tensor, routes: Routes, *, w: dict | None = None) -> torch.Tensor:
        """Only the routes: the compiled CPU op for the built-in experts (GELU, no biases, not
        gated) where it is built, else grouped GEMMs. ``w`` as in ``forward_dense``."""
        w = self._stacked() if w is None else w
        if self._compiled_op_applies(x_TD):
            token_R, gate_R, counts_E = self._nonzero_routes_by_expert(routes)
            return sparse_gelu_experts(x_TD, w["w_in"], w["w_out"], gate_R.to(x_TD.dtype), token_R, counts_E)
        return self.forward_grouped(x_TD, routes, w=w)

    @staticmethod
    def _nonzero_routes_by_expert(routes: Routes):
        """For the CPU op: the routes with a non-zero gate, sorted by expert and then by token:
        token_R, gate_R and the routes per expert [E]. ``nonzero`` reads the device back, which costs
        nothing on the CPU, and over the dense gates it is cheaper there than sorting the routes."""
        gates_TE = routes.dense()
        expert_R, token_R = gates_TE.t().nonzero(as_tuple=True)  # row-major over [E, T]: sorted by expert
        return token_R, gates_TE[token_R, expert_R], torch.bincount(expert_R, minlength=routes.num_experts)

    def _compiled_op_applies(self, x_TD: torch.Tensor) -> bool:
        built_in = self.activation is F.gelu and self.b_in is None and self.w_gate is None
        same_dtype = x_TD.dtype == self.w_in.dtype
        return x_TD.device.type == "cpu" and built_in and same_dtype and load_op() is not None

    def forward_grouped(self, x_TD: torch.Tensor, routes: Routes, *, w: dict | None = None) -> torch.Tensor:
        """The routes sorted by expert into padded groups, grouped GEMMs with the gate inside the
        activation, then each token's K result rows gathered back and summed -> [T, D].

        Nothing is read back to the host where ``torch._grouped_mm`` applies: the layout is built
        on the device (``grouped_layout``), and both ways of every row move are gathers, so the
        result is the same from run to run (no atomics). ``w`` as in ``forward_dense``.
        """
        w = self._stacked() if w is None else w
        (T, K), E = routes.expert_TK.shape, w["w_in"].shape[0]
        grouped = grouped_mm_applies(x_TD, [w["w_in"], w["w_out"]])
        layout = grouped_layout(routes.expert_TK, E, group_alignment(x_TD) if grouped else 1)
        # Padding rows get copies of real rows (finite): their results are never gathered back.
        x_QD = gather_rows(x_TD, layout.route_Q, layout.slot_R, fold=K, zero_missing=False)
        gate_R1 = routes.gate_TK.reshape(-1, 1).to(x_TD.dtype)
        gate_Q1 = gather_rows(gate_R1, layout.route_Q, layout.slot_R, zero_missing=False)
        b = w.get("b_in")
        b_in = None if b is None else b.index_select(0, layout.expert_Q())
        project = lambda m: grouped_matmul(x_QD, m.transpose(1, 2), layout.offs_E, grouped)  # noqa: E731
        h_QH = self._gated_hidden(project, w, b_in, gate_Q1, (-1, self.d_hidden))
        y_QD = grouped_matmul(h_QH, w["w_out"], layout.offs_E, grouped)
        # Back in token order; padding rows get a zero gradient, so they add nothing to the weights'.
        y_RD = gather_rows(y_QD, layout.slot_R, layout.route_Q)
        return y_RD.view(T, K, -1).sum(1)


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
