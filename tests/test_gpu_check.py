"""make gpu-check on a machine without CUDA: one line, exit 0, nothing run or written.

(On a GPU machine this file is skipped: there the command is the full check, minutes long.)"""

import os
import subprocess
import sys

import pytest
import torch

from .launch import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, gpu-check runs the whole check")
def test_gpu_check_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out)}
    proc = subprocess.run(["make", "gpu-check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("bash ")]  # make echoes the command
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here"), proc.stdout
    assert not out.exists()
