"""GELU of each expert's hidden units times that expert's gate, with fewer full-size buffers.

The dense-masked path computes ``gelu(pre) * gate`` over every token and every expert's hidden
units ([T, E, H], as big as a dense FFN's hidden layer). Left to autograd, that costs the GELU
output, the product, and in backward three more buffers of that size, and the GELU output
stays alive until backward. This function keeps only ``pre`` and the gates; backward
recomputes the GELU in row chunks of a few MiB, reusing each chunk's buffer for the gated
gradient, and writes the input gradient in place, so its only full-size buffer is that
gradient. On the CPU every large buffer may be a fresh mmap whose page faults cost more than
the arithmetic (see ``smoe_ds.moe.experts.CPU_ROUTE_BUFFER_BYTES``): at k = N on the
benchmark's shape B the dense-masked path went from seven [T, E, H] buffers per step to four,
as many as the dense FFN's, and from 1.13 to 1.04 x its time (same process, 2 threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatedGelu(torch.autograd.Function):
    """pre [T, E, H], gates [T, E, 1] -> gelu(pre) * gates [T, E, H] (exact GELU, as ``F.gelu``)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, gates)
        return F.gelu(pre).mul_(gates)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, gates = ctx.saved_tensors
        grad_pre = torch.empty_like(pre)
        grad_gates = torch.empty_like(gates) if ctx.needs_input_grad[1] else None
        # On the CPU in row chunks, so that the recomputed GELU is a small buffer reused by each
        # chunk; a GPU's caching allocator makes one chunk cheapest there.
        row_bytes = max(1, pre[0].numel() * pre.element_size())
        rows = max(1, CPU_CHUNK_BYTES // row_bytes) if pre.device.type == "cpu" else pre.shape[0]
        for start in range(0, pre.shape[0], rows):
            part = slice(start, start + rows)
            act = F.gelu(pre[part])
            if grad_gates is not None:  # sum over H of grad_out * act, as a batched dot product
                grad_gates[part] = torch.einsum("teh,teh->te", grad_out[part], act).unsqueeze(-1)
            gated = torch.mul(grad_out[part], gates[part], out=act)  # act is not needed any more
            torch.ops.aten.gelu_backward.grad_input(gated, pre[part], approximate="none", grad_input=grad_pre[part])
        return grad_pre, grad_gates


CPU_CHUNK_BYTES = 4 << 20  # the recomputed GELU per chunk: small enough for the heap, big enough to stream


def gated_gelu(pre_TEH: torch.Tensor, gates_TE1: torch.Tensor) -> torch.Tensor:
    return GatedGelu.apply(pre_TEH, gates_TE1)
