"""GELU of each expert's hidden units times that expert's gate, in one fused elementwise pass.

The Python paths' form (GPUs, and the CPU where the compiled ops of ``smoe_ds.moe.cpu_experts`` are
not built or do not apply), on both the dense-masked path ([T, E, H] hidden units, gates
[T, E, 1]) and the sparse one ([Q, H] route rows, gates [Q, 1]). ``gated_gelu`` picks the form:

- inside ``torch.compile``, the plain expression: the compiler fuses it with its neighbours;
- on a GPU, the same expression compiled once (dynamic shapes) into one kernel each way, so the
  gate costs no pass over the hidden units of its own; where it cannot be compiled (no Triton),
  ``GatedGelu`` with a one-line warning;
- on the CPU, ``GatedGelu``: compiling there needs a C++ compiler in every process that runs the
  layer (seconds each, and none where the CPU ops could not be built either).

The two forms are timed against each other by ``python -m smoe_ds.bench.gated_gelu`` (figures in
docs/performance.md); on the CPU the built-in experts run the compiled CPU ops, not this.

``GatedGelu`` keeps ``pre``, the gates and its own output (which the next GEMM saves anyway).
Left to autograd, ``gelu(pre) * gate`` costs the GELU output, the product, and in backward three
more buffers of that size, and the GELU output stays alive until backward. Backward works in row
chunks of a few MiB, reusing each chunk's buffer, and writes the input gradient in place, so on
the CPU its only full-size buffer is that gradient; on a GPU the chunk is the whole tensor. On the
CPU every large buffer may be a fresh mmap whose page faults cost more than the arithmetic: at
k = N on the benchmark's shape B the dense-masked path went from seven [T, E, H] buffers per step
to four, as many as the dense FFN's, and from 1.13 to 1.04 x its time (same process, 2 threads).

The gates' gradient is sum_h grad_out * gelu(pre). On the CPU, when no gate is so small that
dividing by it loses precision, gelu(pre) is read back as output / gate rather than
recomputed: a batched dot product of grad_out and the output, divided by the gates once per
row, costs less than a second GELU and its temporary (measured in docs/performance.md,
"Measurements behind the code's choices"). GPUs recompute it, which needs no host sync to check
the gates.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

CPU_CHUNK_BYTES = 4 << 20  # one chunk's buffer: small enough for the heap, big enough to stream

# Reading gelu(pre) back as output / gate is exact to rounding while the product is a normal
# number; where it went subnormal (or to zero) the absolute error is at most the subnormal
# spacing / gate. Below this bound that error is far under any rounding of the sums.
_MAX_READBACK_ERROR = 1e-30


def _can_read_back(gates: torch.Tensor) -> bool:
    """True when output / gates recovers gelu(pre) to rounding (CPU only: it reads the minimum)."""
    if gates.device.type != "cpu" or gates.numel() == 0:
        return False
    info = torch.finfo(gates.dtype)
    return info.tiny * info.eps <= _MAX_READBACK_ERROR * float(gates.detach().abs().min())


class GatedGelu(torch.autograd.Function):
    """pre [..., H], gates [..., 1] -> gelu(pre) * gates [..., H] (exact GELU, as ``F.gelu``)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = F.gelu(pre).mul_(gates)
        ctx.save_for_backward(pre, gates, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, gates, out = ctx.saved_tensors
        grad_pre = torch.empty_like(pre)
        need_gates = ctx.needs_input_grad[1]
        read_back = need_gates and _can_read_back(gates)
        grad_gates = None
        if read_back:  # a batched dot product over H: no [T, E, H] temporary at all
            grad_gates = torch.einsum("...h,...h->...", grad_out, out).unsqueeze(-1).div_(gates)
        elif need_gates:
            grad_gates = torch.empty_like(gates)
        # On the CPU in row chunks, all through one buffer allocated once: a buffer allocated per
        # chunk can come back as a fresh mmap each time, and its page faults cost 1 ms a step on
        # shape B. A GPU's caching allocator makes one chunk cheapest there.
        row_bytes = max(1, pre[0].numel() * pre.element_size())
        rows = max(1, CPU_CHUNK_BYTES // row_bytes) if pre.device.type == "cpu" else pre.shape[0]
        chunk_buf = pre.new_empty((min(rows, pre.shape[0]), *pre.shape[1:]))
        for start in range(0, pre.shape[0], rows):
            part = slice(start, start + rows)
            buf = chunk_buf[: grad_out[part].shape[0]]
            if need_gates and not read_back:  # sum over H of grad_out * gelu(pre)
                torch.ops.aten.gelu.out(pre[part], approximate="none", out=buf).mul_(grad_out[part])
                torch.sum(buf, dim=-1, keepdim=True, out=grad_gates[part])
            torch.mul(grad_out[part], gates[part], out=buf)
            torch.ops.aten.gelu_backward.grad_input(buf, pre[part], approximate="none", grad_input=grad_pre[part])
        return grad_pre, grad_gates


def _gelu_times_gate(pre: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    return F.gelu(pre) * gates


@functools.cache
def _compiled_gelu_times_gate():
    """``_gelu_times_gate`` compiled for any shape: one generated kernel forward, one backward."""
    return torch.compile(_gelu_times_gate, dynamic=True)


_COMPILE_FAILED: set = set()  # device types where compiling the fused pass failed


def fuses_by_compiling(pre: torch.Tensor) -> bool:
    """Whether ``gated_gelu`` runs the compiled one-kernel form for ``pre`` (see the module's docstring)."""
    return pre.device.type == "cuda" and pre.device.type not in _COMPILE_FAILED


def gated_gelu(pre: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """gelu(pre) * gates, ``pre`` [..., H] and ``gates`` [..., 1], in one fused elementwise pass."""
    if torch.compiler.is_compiling():
        return _gelu_times_gate(pre, gates)
    if fuses_by_compiling(pre):
        try:
            return _compiled_gelu_times_gate()(pre, gates)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # no Triton or no working compiler here: the eager form, once warned
            _COMPILE_FAILED.add(pre.device.type)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"smoe_ds: could not compile the fused GELU x gate ({first_line}); eager form", stacklevel=2)
    return GatedGelu.apply(pre, gates)
