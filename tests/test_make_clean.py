"""No make target destroys a run unless its name says so: the real Makefile's ``clean`` and
``clean-runs``, run by make in a scratch folder that holds a copy of the Makefile, build outputs
and runs (the repository's own .venv and runs/ are never touched)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers.launch import REPO

BUILT = [".venv/bin/python", "build/lib/smoe_ds/x.py", "smoe_ds.egg-info/PKG-INFO", "smoe_ds/__pycache__/x.pyc"]
RUNS = ["runs/cpu_tiny/self_slimming.json", "runs/cpu_tiny/checkpoints/latest", "runs/cpu_tiny/eval/step500/x.json"]
# Not the build's either: the source, and the GPU wheels the offline GPU machine cannot download again.
SOURCES = ["smoe_ds/train.py", ".whl/deepspeed-0.19.8-py3-none-any.whl"]


@pytest.fixture
def checkout(tmp_path):
    """A scratch folder with the Makefile and one file at each path above, each holding its own name."""
    shutil.copy(REPO / "Makefile", tmp_path)
    for name in BUILT + RUNS + SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    return tmp_path


def make(folder, target: str) -> None:
    proc = subprocess.run(["make", target], cwd=folder, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_make_clean_removes_the_build_and_keeps_every_run(checkout):
    make(checkout, "clean")
    for name in BUILT:
        assert not (checkout / name).exists(), f"make clean left {name}"
    assert not (checkout / ".venv").exists() and not (checkout / "smoe_ds.egg-info").exists()
    for name in RUNS + SOURCES:
        assert (checkout / name).read_text() == name, f"make clean removed {name}"


def test_make_clean_runs_is_the_target_that_deletes_runs(checkout):
    make(checkout, "clean-runs")
    assert not (checkout / "runs").exists()
    for name in BUILT + SOURCES:
        assert (checkout / name).read_text() == name
