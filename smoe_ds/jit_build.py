"""What every just-in-time built op shares: torch's extensions folder and a watch on its build locks.

torch's JIT extension builder compiles an op into ``$TORCH_EXTENSIONS_DIR/<op name>``
(default ``~/.cache/torch_extensions/<python>_<cpu|cuXY>``) and holds that folder's ``lock``
file while it builds. A process killed mid-build leaves the lock behind, and torch then waits
on it forever in every later start; :class:`LockWatchdog` says which file to delete. DeepSpeed's
CPU ops (``smoe_ds.deepspeed_ops``) and smoe_ds's own (``smoe_ds.moe.cpu_experts``) both build
this way.
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
