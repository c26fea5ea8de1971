"""What every just-in-time built op shares: torch's extensions folder and a watch on its build locks.

torch's JIT extension builder compiles an op into ``$TORCH_EXTENSIONS_DIR/<op name>``
(default ``~/.cache/torch_extensions/<python>_<cpu|cuXY>``) and holds that folder's ``lock``
file while it builds. A process killed mid-build leaves the lock behind, and torch then waits
on it forever in every later start; :class:`LockWatchdog` says which file to delete. DeepSpeed's
CPU ops (``smoe_ds.ops.prebuild``) and smoe_ds's own (``smoe_ds.moe.cpu_experts``) both build
this way, always with the same ninja (:func:`use_this_pythons_ninja`), so that a built op is not
built again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def extensions_dir() -> Path:
    """Where torch puts JIT-built extensions (the same rule as torch.utils.cpp_extension)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path.home() / ".cache" / "torch_extensions" / f"{version}_{flavour}"


def use_this_pythons_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when it holds a ``ninja`` (a virtual
    environment with pip's ninja), for this process and the builds it starts.

    torch's builder runs whichever ninja PATH finds, and ninja versions log build commands
    differently, so an op built by one and loaded by the other is rebuilt, each time a run is
    started the other way (``.venv/bin/python -m ...`` with and without the venv on PATH).
    Called before any op loads."""
    bin_dir = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (bin_dir / "ninja").exists() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}" if path else str(bin_dir)


def build_lock(op_name: str) -> Path:
    """The lock file torch holds while it builds ``op_name``."""
    return extensions_dir() / op_name / "lock"


class LockWatchdog:
    """A context manager: warn, naming the file, when the block is still running after ``after_s``
    seconds while the build lock ``lock`` exists. The block itself is left alone: a build by
    another process may be legitimately slow."""

    def __init__(self, lock: Path, after_s: float = 120.0):
        self.after_s = after_s
        self.lock = lock
        self._done = threading.Event()

    def _watch(self) -> None:
        while not self._done.wait(self.after_s):
            if self.lock.exists():
                age = time.time() - self.lock.stat().st_mtime
                print(
                    f"smoe_ds: start-up has waited {self.after_s:.0f}s on {self.lock} (created {age:.0f}s ago). "
                    "If no op build (DeepSpeed's or smoe_ds's) is running on this machine, that lock is stale "
                    "(left by a process killed mid-build): delete it and start again.",
                    file=sys.stderr,
                    flush=True,
                )

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="smoe-ds-lock-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def building(op_name: str, after_s: float = 120.0) -> LockWatchdog:
    """What every site that may build an op enters: this interpreter's ninja first on PATH
    (``use_this_pythons_ninja``) and a watch on ``op_name``'s build lock."""
    use_this_pythons_ninja()
    return LockWatchdog(build_lock(op_name), after_s)
