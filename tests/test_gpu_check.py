"""make gpu-check on a machine without CUDA: one line, exit 0, nothing run or written.

(On a GPU machine this file is skipped: there the command is the full check, minutes long.)"""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, gpu-check runs the whole check")
def test_gpu_check_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    # Not a sub-make of `make test`: its MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(PYTHON=sys.executable, GPU_CHECK_OUT=str(out))
    cmd = ["make", "--silent", "gpu-check"]  # --silent: without make's echo of the recipe
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here"), proc.stdout
    assert not out.exists()
