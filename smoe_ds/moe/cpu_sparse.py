"""The sparse path of the built-in experts on the CPU, as a compiled op (``csrc/sparse_gelu_experts.cpp``).

Shape legend: T tokens, D d_model, E local experts, H expert width, R routes sorted by expert.

The op is built on first use with torch's JIT extension builder (into ``$TORCH_EXTENSIONS_DIR``,
like DeepSpeed's CPU ops; ``python -m smoe_ds.deepspeed_ops`` builds both ahead of time). Where
it cannot be built (no C++ compiler), :func:`load_op` warns once and returns None, and the
layer keeps to its grouped-GEMM path in Python, which computes the same thing more slowly.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

OP_NAME = "smoe_ds_sparse_gelu_experts"
SOURCE = Path(__file__).with_name("csrc") / "sparse_gelu_experts.cpp"


@functools.cache
def load_op():
    """The compiled op (module with ``forward`` and ``backward``), or None where it cannot be built."""
    from torch.utils.cpp_extension import load

    from smoe_ds.deepspeed_ops import extensions_dir, lock_watchdog

    try:
        # -fopenmp compiles at::parallel_for's parallel region; it links against torch's own OpenMP.
        with lock_watchdog(after_s=120.0, lock=extensions_dir() / OP_NAME / "lock"):
            return load(OP_NAME, [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], verbose=False)
    except Exception as err:  # no compiler or ninja, a broken toolchain: fall back, loudly, once
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"smoe_ds: could not build the CPU sparse-experts op ({first_line}); "
            "the sparse path runs as grouped GEMMs in Python instead (same results, slower)",
            stacklevel=2,
        )
        return None


class SparseGeluExperts(torch.autograd.Function):
    """x_TD, w_in [E, H, D], w_out [E, H, D], gate_R [R], token_R [R], offsets [E + 1] -> y_TD.

    Keeps only the pre-activations [R, H] for backward (the gathered inputs are gathered again),
    so the saved memory is H / D of what the grouped path keeps for its inputs.
    """

    @staticmethod
    def forward(ctx, x_TD, w_in, w_out, gate_R, token_R, offsets):
        y_TD, pre_RH = load_op().forward(x_TD, w_in, w_out, gate_R, token_R, offsets)
        ctx.save_for_backward(x_TD, w_in, w_out, gate_R, token_R, offsets, pre_RH)
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, w_in, w_out, gate_R, token_R, offsets, pre_RH = ctx.saved_tensors
        grads = load_op().backward(grad_y_TD.contiguous(), x_TD, w_in, w_out, gate_R, token_R, offsets, pre_RH)
        return (*grads, None, None)


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
