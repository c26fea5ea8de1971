"""Returning the heap's free memory (smoe_ds.heap), on the real C library of this machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from smoe_ds.heap import _malloc_trim, trims_at

# A fragmented heap, as a run with tensors that change size leaves it: 3,000 tensors of 64 KiB
# (below glibc's mmap threshold, so they come from the heap), every tenth kept alive so that the
# free ones lie inside the heap rather than at its top, where free() alone would return them.
FRAGMENT_AND_TRIM = textwrap.dedent(
    """
    import json, torch
    from smoe_ds.heap import release_free_heap
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    blocks = [torch.ones(16 * 1024) for _ in range(3000)]
    kept = blocks[::10]
    del blocks
    before = rss_mib()
    released = release_free_heap()
    print(json.dumps({"before": before, "after": rss_mib(), "released": released, "kept": len(kept)}))
    """
)


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_heap_returns_the_free_pages_inside_a_fragmented_heap():
    import json

    out = subprocess.run([sys.executable, "-c", FRAGMENT_AND_TRIM], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["released"]
    # 2,700 freed blocks of 64 KiB are 169 MiB; at least 100 MiB of them must leave the process.
    assert row["before"] - row["after"] > 100, row


@pytest.mark.parametrize(
    "step, interval, device, expected",
    [
        (20, 20, "cpu", True),
        (40, 20, torch.device("cpu"), True),
        (21, 20, "cpu", False),
        (20, 0, "cpu", False),  # 0: never
        (20, 20, None, True),  # DeepSpeed's CPU accelerator without a local rank
        (20, 20, "cuda:0", False),  # GPU memory is not in this heap
    ],
)
def test_trims_every_interval_steps_on_the_cpu_only(step, interval, device, expected):
    assert trims_at(step, interval, device) is expected
