"""Handing the heap's free memory back to the operating system during CPU runs.

On the CPU, torch allocates tensors with the C library's malloc. With glibc, a run whose tensors
change size from step to step fragments the heap: freed blocks stay resident but no longer fit
the next, differently sized, requests, so the resident memory of each rank keeps growing without
any tensor being leaked. Fine-tuning a Hugging Face model with SMoE-Dropout is such a run: the
batches are padded to their longest sequence, and under expert parallelism each rank's experts
receive a different number of tokens at every layer and step: each rank's memory grows for
minutes while the dense fine-tune's stays flat.

``malloc_trim(0)`` returns the free pages inside the heap as well as at its top. Checked every
``run.heap_trim_interval`` steps and called once a rank grew by ``MIN_GROWTH_BYTES`` it slows the
growth at no measurable cost; it does not stop it. Making glibc return every large block as it is
freed (``MALLOC_TRIM_THRESHOLD_=0``) keeps the memory flat but slows the fine-tune, so that is left
to the user. docs/memory.md, "Memory over a long CPU run", has the figures and says how.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
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


# Trim only once the resident memory has grown this much since the last trim (or the first check):
# a trim costs about 120 ms on a rank of the test suite's tiny LM (madvise over every free chunk,
# and the pages faulted back in), which at every 5 steps was a fifth of that job's step time,
# while runs whose tensors keep their sizes (the built-in LM's) barely grow and need none.
MIN_GROWTH_BYTES = 128 << 20


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Called after every optimizer step; every ``interval`` steps (0: never) of a run on the CPU
    it reads the resident memory and trims the heap if it grew by ``min_growth`` bytes since the
    last trim or the first check. GPU tensors live in a caching allocator, not in this heap;
    ``device`` is the engine's (None, as DeepSpeed's CPU accelerator gives it without a local
    rank, means the CPU). ``rss`` reads the resident memory (tests pass their own)."""

    def __init__(
        self,
        interval: int,
        device: torch.device | str | None,
        min_growth: int = MIN_GROWTH_BYTES,
        rss: Callable[[], int] = resident_bytes,
    ) -> None:
        on_cpu = torch.device(device or "cpu").type == "cpu"
        self.interval = interval if on_cpu and _malloc_trim() is not None else 0
        self.min_growth, self.rss = min_growth, rss
        self.baseline: int | None = None
        self.trims = 0

    def step_done(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): trim if due; returns whether it trimmed."""
        if not self.interval or step % self.interval:
            return False
        now = self.rss()
        if self.baseline is None:  # the first check sets the level growth is measured from
            self.baseline = now
            return False
        if now - self.baseline < self.min_growth:
            return False
        release_free_heap()
        self.trims += 1
        self.baseline = self.rss()
        return True
