"""Moving rows by index in both directions with gathers only: deterministic, no atomics.

``src[index]`` differentiated by autograd scatter-adds the gradient back (``index_add_``): on a GPU
that is atomic adds, whose order, and so whose rounding in bf16, changes from run to run whenever
an index repeats. When the caller also holds the inverse map, the gradient is a gather too, and a
source row used ``fold`` times (a token sent to K experts) sums its ``fold`` gradient rows in a
fixed order.
"""

from __future__ import annotations

import torch


def _take(src: torch.Tensor, index: torch.Tensor, fold: int, zero_missing: bool) -> torch.Tensor:
    """Rows ``src[index // fold]``; a row of ``index`` equal to ``len(src) * fold`` (none) is zero
    with ``zero_missing``, else an arbitrary (finite) row of ``src``."""
    n = src.shape[0]
    if n == 0:
        return src.new_zeros((index.shape[0], *src.shape[1:]))
    rows = src.index_select(0, (index // fold).clamp_max(n - 1))
    if zero_missing:
        missing = (index == n * fold).view(-1, *([1] * (src.dim() - 1)))
        rows = rows.masked_fill(missing, 0)
    return rows


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, inverse, fold: int, zero_missing: bool):
        ctx.save_for_backward(inverse)
        ctx.fold, ctx.rows_out = fold, index.shape[0]
        return _take(src, index, fold, zero_missing)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        # inverse lists the output row of each of the src x fold virtual rows, rows_out where none is
        grad = _take(grad_out, inverse, 1, zero_missing=inverse.shape[0] > ctx.rows_out)
        return grad.view(-1, ctx.fold, *grad.shape[1:]).sum(1), None, None, None, None


def gather_rows(
    src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fold: int = 1, zero_missing: bool = True
) -> torch.Tensor:
    """``src`` [n, ...] -> [m, ...]: row i is ``src[index[i] // fold]``, the source seen as n x fold
    virtual rows (virtual row v is source row v // fold), each of which ``index`` names at most once.

    ``index`` [m] may name ``n * fold`` (no virtual row) when m > n * fold: that output row is zero,
    or with ``zero_missing=False`` a copy of some source row, for a caller that never reads it
    back. ``inverse`` [n * fold] is the map the other way: the output row of each virtual row, m
    where none (possible when n * fold > m). Backward gathers the gradient with ``inverse`` and sums
    each source row's ``fold`` rows. Which rows can be missing follows from the sizes, which the
    host knows, so the zero-filling pass runs only where it can matter.
    """
    zero_missing = zero_missing and index.shape[0] > src.shape[0] * fold
    return _GatherRows.apply(src, index, inverse, fold, zero_missing)
