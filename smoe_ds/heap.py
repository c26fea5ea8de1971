"""Handing the heap's free memory back to the operating system during CPU runs.

On the CPU, torch allocates tensors with the C library's malloc. With glibc, a run whose tensors
change size from step to step fragments the heap: freed blocks stay resident but no longer fit
the next, differently sized, requests, so the resident memory of each rank keeps growing without
any tensor being leaked. Fine-tuning a Hugging Face model with SMoE-Dropout is such a run: the
batches are padded to their longest sequence, and under expert parallelism each rank's experts
receive a different number of tokens at every layer and step. Measured (MiniLM, ASDiv-A, ep_size
2, 240 steps, 2 ranks on 2 cores; the README's "Memory over a long CPU run" gives the figures):
each rank grew from 1.2 to 3.2 GiB in 7 minutes; the dense fine-tune stayed flat.

``malloc_trim(0)`` returns the free pages inside the heap as well as at its top. Called every
``run.heap_trim_interval`` steps it slows the growth at no measurable cost (peak 3,113 -> 2,067 MiB
per rank over 160 steps at every 5 steps, 260 -> 262 s); it does not stop it. Making glibc return
every large block as it is freed (``MALLOC_TRIM_THRESHOLD_=0``) keeps the memory flat but made the
fine-tune 20 % slower, so that is left to the user (the README says how).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None under another C library (musl, macOS) that has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the operating system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trims_at(step: int, interval: int, device: torch.device | str | None) -> bool:
    """Whether a loop trims the heap after optimizer step ``step`` (1-based): every ``interval``
    steps (0: never) of a run on the CPU. GPU tensors live in a caching allocator, not in this
    heap. ``device`` is the engine's (None, as DeepSpeed's CPU accelerator gives it without a
    local rank, means the CPU)."""
    on_cpu = torch.device(device or "cpu").type == "cpu"
    return on_cpu and interval > 0 and step % interval == 0
