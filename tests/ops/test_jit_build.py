"""The JIT builds always find the same ninja (smoe_ds.ops.jit_build), whatever PATH a run starts with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIND_NINJA = (
    "import shutil; from smoe_ds.ops.jit_build import use_this_pythons_ninja; "
    "before = shutil.which('ninja'); use_this_pythons_ninja(); use_this_pythons_ninja(); "
    "import os; print(before, shutil.which('ninja'), os.environ['PATH'].count(os.pathsep), sep='|')"
)


@pytest.mark.skipif(not (Path(sys.executable).parent / "ninja").exists(), reason="no ninja beside this Python")
def test_builds_use_the_ninja_beside_this_python_even_when_path_lacks_it():
    """Started as `.venv/bin/python -m ...` with only the system folders on PATH, a build would run
    the system's ninja (another version, which rebuilds every op); the venv's is put first, once."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", FIND_NINJA], env=env, capture_output=True, text=True, check=True)
    before, after, separators = out.stdout.strip().split("|")
    assert after == str(Path(sys.executable).parent / "ninja")
    assert before != after
    assert int(separators) == 2  # put first once: "venv/bin:/usr/bin:/bin"
