"""DeepSpeed's just-in-time compiled CPU ops: build them once, up front, and clean up after them.

On the CPU accelerator ``deepspeed.init_distributed`` compiles the ``deepspeed_shm_comm`` op
into torch's extensions folder (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) the first time it runs. Two hazards follow, both seen here:

* Every rank of a fresh machine's first job compiles at once, under whatever timeout the job
  has. A process killed during the build leaves the folder's ``lock`` file behind, and torch
  then waits on it forever in every later start. So ``python -m smoe_ds.ops.prebuild``
  (run by ``make``'s install step) builds the op once in one process, and
  :func:`lock_watchdog` names its lock when start-up has waited on it for too long.
* When the deepspeed launcher sets ``LOCAL_SIZE`` the op allocates a 69 MB buffer per rank in
  ``/dev/shm`` and never unlinks it, so every run leaks RAM until the machine is rebooted.
  :func:`without_shm_allreduce` keeps it off.

smoe_ds's own CPU ops, the built-in experts' compute paths (``smoe_ds.moe.cpu_experts``), are
JIT-built into the same folder on first use, and :func:`prebuild` builds them up front too.
What both kinds of op share (the folder, the lock watch) is ``smoe_ds.ops.jit_build``.

On GPUs DeepSpeed JIT-builds FusedAdam when the engine starts. DeepSpeed 0.19.8 cannot parse
the architecture-specific targets that ``TORCH_CUDA_ARCH_LIST`` may name on Hopper and later
(``9.0a``, ``10.0f``): its builder fails with ``invalid literal for int() with base 10: '0a'``
(seen on the H200 of ``make gpu-check``; DeepSpeed issue 7589, fix proposed in PR 8619).
:func:`deepspeed_arch_list` rewrites them to the plain targets FusedAdam needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from smoe_ds.ops.jit_build import LockWatchdog, building, extensions_dir, use_this_pythons_ninja

SHM_COMM_OP = "ShareMemCommBuilder"
SHM_COMM_OP_NAME = "deepspeed_shm_comm"  # its folder in the extensions folder
SHM_DIR = Path("/dev/shm")
ARCH_VARIANT = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")  # 9.0a, 10.0f+PTX: the suffix is the variant


def lock_watchdog(after_s: float = 120.0) -> LockWatchdog:
    """Watch the build lock of DeepSpeed's shm op, the one process-group start-up may wait on."""
    return building(SHM_COMM_OP_NAME, after_s)


def prebuild() -> bool:
    """Compile, in this process, DeepSpeed's shm op where this accelerator has one, and smoe_ds's
    CPU experts ops (``smoe_ds.moe.cpu_experts``; without a compiler it warns and is skipped).

    Returns True when DeepSpeed's op was built (or already was), False when it does not apply.
    """
    from deepspeed.accelerator import get_accelerator

    from smoe_ds.moe.cpu_experts import load_op

    load_op()
    builder = get_accelerator().create_op_builder(SHM_COMM_OP)
    if builder is None or not builder.is_compatible():
        return False
    with lock_watchdog(after_s=300):
        builder.load(verbose=False)
    return True


@contextlib.contextmanager
def without_shm_allreduce():
    """Keep DeepSpeed's CPU shm allreduce off while the process group starts.

    The op switches itself on when ``LOCAL_SIZE`` (set by the deepspeed launcher) equals the
    world size. We keep gloo's allreduce instead: the op puts a 69 MB buffer per rank in
    /dev/shm and never unlinks it (every run leaks RAM; a container's default 64 MB /dev/shm
    makes the ranks crash), and a rank waits without a timeout for a peer's buffer to appear,
    so a peer that dies early hangs it. ``LOCAL_SIZE`` is put back afterwards.
    """
    saved = os.environ.pop("LOCAL_SIZE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_SIZE"] = saved


def deepspeed_arch_list(arch_list: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed 0.19.8's op builder can parse it: variant targets
    (``9.0a``, ``10.0f+PTX``) become their plain form (``9.0``, ``10.0+PTX``), duplicates go, the
    order stays. The variants only add instructions FusedAdam does not use."""
    kept: list[str] = []
    for entry in arch_list.replace(";", " ").split():
        m = ARCH_VARIANT.match(entry)
        plain = m.group(1) + (m.group(2) or "") if m else entry
        if plain not in kept:
            kept.append(plain)
    return ";".join(kept)


def fix_cuda_arch_list_for_deepspeed() -> None:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` in this process (see :func:`deepspeed_arch_list`), saying so,
    before DeepSpeed builds a CUDA op; nothing happens when it has no variant target."""
    current = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not current:
        return
    fixed = deepspeed_arch_list(current)
    if fixed != current.strip():
        print(f"smoe_ds: TORCH_CUDA_ARCH_LIST={current!r} -> {fixed!r} for DeepSpeed's op builder", file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


def build_fused_adam() -> None:
    """JIT-build DeepSpeed's CUDA FusedAdam now, in this process (what the engine would do at start-up)."""
    from deepspeed.ops.op_builder import FusedAdamBuilder

    fix_cuda_arch_list_for_deepspeed()
    use_this_pythons_ninja()
    FusedAdamBuilder().load(verbose=False)


def shm_buffers(master_port: int | str) -> list[Path]:
    """The /dev/shm buffers DeepSpeed's shm op made for the job on ``master_port`` (should be none)."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m smoe_ds.ops.prebuild",
        description="Compile DeepSpeed's CPU shm op and smoe_ds's CPU experts ops once, now.",
    )
    p.add_argument("--fused-adam", action="store_true", help="instead, build DeepSpeed's CUDA FusedAdam (GPU machines)")
    args = p.parse_args(argv)
    start = time.time()
    if args.fused_adam:
        build_fused_adam()
        print(f"smoe_ds: DeepSpeed's FusedAdam ready ({time.time() - start:.0f}s)")
        return 0
    print(
        f"smoe_ds: building DeepSpeed's and smoe_ds's CPU ops into {extensions_dir()} (about a minute the first time)"
    )
    built = prebuild()
    took = time.time() - start
    print(f"smoe_ds: DeepSpeed ops ready ({took:.0f}s)" if built else "smoe_ds: no DeepSpeed ops to build here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
