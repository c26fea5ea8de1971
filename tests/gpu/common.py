"""What the GPU tests share: the device they run on, their marks and the bf16/fp32 tolerances.

They run where CUDA is (``pytest -m gpu``; ``make gpu-check`` runs them) and are skipped
elsewhere, CI included. ``SMOE_DS_GPU_TEST_DEVICE=cpu`` runs them on the CPU instead: that checks
the tests themselves off a GPU (the CUDA-only assertions, e.g. peak CUDA memory, still skip).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("SMOE_DS_GPU_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Largest relative error ||a - b|| / ||b|| against an fp32 (or fp64) reference. fp32: summation
# order only (no TF32: PyTorch keeps it off for matmuls by default). bf16 keeps 8 bits of
# mantissa (relative rounding 2^-9 = 0.002 per value); errors grow through two GEMMs, GELU and
# the gate softmax, so 2e-2 is about ten roundings, while a wrong expert, slot or gate gives O(1).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (0 when both are zero)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
