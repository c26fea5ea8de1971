"""The built-in experts' sparse and dense-masked paths on the CPU, as compiled ops
(``csrc/gelu_experts.cpp``; the file says why they are compiled).

Shape legend: T tokens, D d_model, E local experts, H expert width, R routes sorted by expert.

The ops are built on first use with torch's JIT extension builder (into ``$TORCH_EXTENSIONS_DIR``,
like DeepSpeed's CPU ops: ``smoe_ds.ops.jit_build``; ``python -m smoe_ds.ops.prebuild`` builds both
ahead of time). Where they cannot be built (no C++ compiler), :func:`load_op` warns once and
returns None, and the layer keeps to its Python paths, which compute the same things more slowly.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from smoe_ds.ops.jit_build import building

OP_NAME = "smoe_ds_gelu_experts"
SOURCE = Path(__file__).with_name("csrc") / "gelu_experts.cpp"

# Token rows per block of the dense-masked op: about this many bytes of [rows, E * H] hidden
# units, so that a block's two hidden buffers stay in a core's cache (the block sizes tried:
# docs/performance.md, "Measurements behind the code's choices").
DENSE_BLOCK_BYTES = 1 << 20


@functools.cache
def load_op():
    """The compiled ops (a module), or None where they cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        # -fopenmp compiles at::parallel_for's parallel region; it links against torch's own OpenMP.
        with building(OP_NAME, after_s=120.0):
            return load(OP_NAME, [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], verbose=False)
    except Exception as err:  # no compiler or ninja, a broken toolchain: fall back, loudly, once
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"smoe_ds: could not build the CPU experts ops ({first_line}); "
            "the experts run as Python GEMM paths instead (same results, slower)",
            stacklevel=2,
        )
        return None


class SparseGeluExperts(torch.autograd.Function):
    """x_TD, w_in [E, H, D], w_out [E, H, D], gate_R [R], token_R [R], offsets [E + 1] -> y_TD.

    Keeps only the pre-activations [R, H] for backward (the inputs are gathered again), so it
    saves H / D of the memory the grouped path keeps for its gathered inputs.
    """

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, gate_R, token_R, offsets):
        y_TD, pre_RH = load_op().sparse_forward(x_TD, w_in, w_out, gate_R, token_R, offsets)
        ctx.save_for_backward(x_TD, w_in, w_out, gate_R, token_R, offsets, pre_RH)
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        saved = ctx.saved_tensors
        grads = load_op().sparse_backward(grad_y_TD.contiguous(), *saved)
        return (*grads, None, None)


class DenseGeluExperts(torch.autograd.Function):
    """x_TD, w_in [E, H, D], w_out [E, H, D], gates_TE, block rows -> y_TD; keeps [T, E * H] for backward."""

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, gates_TE, block):
        y_TD, pre = load_op().dense_forward(x_TD, w_in, w_out, gates_TE, block)
        ctx.save_for_backward(x_TD, w_in, w_out, gates_TE, pre)
        ctx.block = block
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        grads = load_op().dense_backward(grad_y_TD.contiguous(), *ctx.saved_tensors, ctx.block)
        return (*grads, None)


def sparse_gelu_experts(
    x_TD: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    gate_R: torch.Tensor,
    token_R: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """sum over routes r of gate_R[r] * gelu(x[token_R[r]] w_in[e]^T) w_out[e] into row token_R[r] -> [T, D],
    for routes sorted by expert with ``counts[e]`` routes for expert e."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SparseGeluExperts.apply(
        x_TD.contiguous(), w_in.contiguous(), w_out.contiguous(), gate_R.contiguous(), token_R.contiguous(), offsets
    )


def dense_gelu_experts(x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, gates_TE: torch.Tensor):
    """sum_e gates_TE[:, e] * gelu(x_TD w_in[e]^T) w_out[e] -> [T, D], every expert on every token."""
    E, H, _ = w_in.shape
    block = max(16, DENSE_BLOCK_BYTES // (E * H * x_TD.element_size()))
    return DenseGeluExperts.apply(
        x_TD.contiguous(), w_in.contiguous(), w_out.contiguous(), gates_TE.to(x_TD.dtype).contiguous(), block
    )
