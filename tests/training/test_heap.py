"""Returning the heap's free memory (smoe_ds.training.heap), on the real C library of this machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from smoe_ds.training.heap import HeapTrimmer, _malloc_trim, resident_bytes

# A fragmented heap, as a run with tensors that change size leaves it: 3,000 tensors of 64 KiB
# (below glibc's mmap threshold, so they come from the heap), every tenth kept alive so that the
# free ones lie inside the heap rather than at its top, where free() alone would return them.
FRAGMENT_AND_TRIM = textwrap.dedent(
    """
    import json, torch
    from smoe_ds.training.heap import release_free_heap, resident_bytes
    def rss_mib():
        return resident_bytes() / 2**20
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


class FakeResidentMemory:
    """A resident-memory reading the test sets (MiB), in place of /proc; the trims are real."""

    def __init__(self) -> None:
        self.mib = 1000

    def __call__(self) -> int:
        return self.mib << 20


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_trims_every_interval_steps_only_once_memory_grew_since_the_last_trim():
    rss = FakeResidentMemory()
    trimmer = HeapTrimmer(5, "cpu", min_growth=128 << 20, rss=rss)
    assert not trimmer.step_done(5)  # the first check sets the baseline (1000 MiB)
    rss.mib = 1200
    assert not trimmer.step_done(7)  # not a checking step
    assert trimmer.step_done(10)  # grew 200 MiB: trimmed; the baseline is now 1200
    rss.mib = 1300
    assert not trimmer.step_done(15)  # grew 100 MiB since the trim: not yet
    rss.mib = 1330
    assert trimmer.step_done(20) and trimmer.trims == 2


@pytest.mark.parametrize("interval, device", [(0, "cpu"), (5, "cuda:0")])
def test_never_trims_when_off_or_on_a_gpu(interval, device):
    rss = FakeResidentMemory()
    trimmer = HeapTrimmer(interval, device, min_growth=1, rss=rss)
    for step in range(1, 21):
        rss.mib += 100
        assert not trimmer.step_done(step)


def test_a_cpu_device_of_none_counts_as_the_cpu():
    """DeepSpeed's CPU accelerator gives engines without a local rank the device None."""
    assert HeapTrimmer(5, None).interval == (5 if _malloc_trim() is not None else 0)


def test_resident_bytes_reads_this_process():
    assert resident_bytes() > 10 << 20  # a Python with torch imported holds far more than 10 MiB
