"""DeepSpeed's just-in-time compiled CPU ops: build them once, up front, and clean up after them.

On the CPU accelerator ``deepspeed.init_distributed`` compiles the ``deepspeed_shm_comm`` op
into torch's extensions folder (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) the first time it runs. Two hazards follow, both seen here:

* Every rank of a fresh machine's first job compiles at once, under whatever timeout the job
  has. A process killed during the build leaves the folder's ``lock`` file behind, and torch
  then waits on it forever in every later start. So ``python -m smoe_ds.deepspeed_ops``
  (run by ``make``'s install step) builds the op once in one process, and
  :func:`lock_watchdog` names a lock that start-up has waited on for too long.
* When the deepspeed launcher sets ``LOCAL_SIZE`` the op allocates a 69 MB buffer per rank in
  ``/dev/shm`` and never unlinks it, so every run leaks RAM until the machine is rebooted.
  :func:`release_shm_buffer` removes this rank's buffer at shutdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

SHM_COMM_OP = "ShareMemCommBuilder"
SHM_DIR = Path("/dev/shm")


def extensions_dir() -> Path:
    """Where torch puts JIT-built extensions (the same rule as torch.utils.cpp_extension)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path.home() / ".cache" / "torch_extensions" / f"{version}_{flavour}"


def build_lock(op_name: str = "deepspeed_shm_comm") -> Path:
    return extensions_dir() / op_name / "lock"


def prebuild() -> bool:
    """Compile DeepSpeed's shm op in this process, if this accelerator has one.

    Returns True when the op was built (or already was), False when it does not apply.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_COMM_OP)
    if builder is None or not builder.is_compatible():
        return False
    with lock_watchdog(after_s=300):
        builder.load(verbose=False)
    return True


class lock_watchdog:  # noqa: N801 - used as a context manager, reads like a statement
    """Warn, naming the file, when the block is still running after ``after_s`` seconds while a
    torch-extensions build lock exists. The block itself is left alone: a build by another
    process may be legitimately slow."""

    def __init__(self, after_s: float = 120.0, lock: Path | None = None):
        self.after_s = after_s
        self.lock = lock
        self._done = threading.Event()

    def _watch(self) -> None:
        lock = self.lock or build_lock()
        while not self._done.wait(self.after_s):
            if lock.exists():
                age = time.time() - lock.stat().st_mtime
                print(
                    f"smoe_ds: start-up has waited {self.after_s:.0f}s on {lock} (created {age:.0f}s ago). "
                    "If no DeepSpeed op build is running on this machine, that lock is stale "
                    "(left by a process killed mid-build): delete it and start again.",
                    file=sys.stderr,
                    flush=True,
                )

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="smoe-ds-lock-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def shm_buffer(rank: int, master_addr: str | None = None, master_port: str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's shm op creates for ``rank`` of the job at addr:port."""
    addr = master_addr if master_addr is not None else os.environ.get("MASTER_ADDR", "")
    port = master_port if master_port is not None else os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's buffer. Call only after a barrier: peers open it by name at start-up."""
    shm_buffer(rank).unlink(missing_ok=True)


def release_job_shm_buffers(master_port: int | str) -> int:
    """Remove every buffer of the job on ``master_port`` (after its ranks died); returns the count."""
    removed = 0
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m smoe_ds.deepspeed_ops", description="Compile DeepSpeed's CPU shm op once, now."
    ).parse_args(argv)
    start = time.time()
    print(f"smoe_ds: building DeepSpeed's CPU ops into {extensions_dir()} (about a minute the first time)")
    built = prebuild()
    took = time.time() - start
    print(f"smoe_ds: DeepSpeed ops ready ({took:.0f}s)" if built else "smoe_ds: no DeepSpeed ops to build here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
