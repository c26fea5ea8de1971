"""Process-group start-up and the few collectives the trainer needs.

The same entry point runs under the deepspeed launcher, torchrun (both set RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT) and mpirun (DeepSpeed's MPI discovery through
mpi4py fills those in). On a machine without GPUs the backend is gloo.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from smoe_ds.ops.prebuild import fix_cuda_arch_list_for_deepspeed, lock_watchdog, without_shm_allreduce


def backend_name() -> str:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().communication_backend_name()
    # DeepSpeed's CPU accelerator names oneCCL, which is rarely installed; gloo always is.
    return "gloo" if get_accelerator().device_name() == "cpu" else name


def init_distributed(master_port: int = 29500, timeout_s: float = 600.0) -> None:
    """Join the process group (a group of one when nothing launched us)."""
    import deepspeed

    if dist.is_initialized():
        return
    launched = any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if not launched:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # MPI discovery ignores MASTER_PORT unless it is passed here explicitly.
    port = int(os.environ.get("MASTER_PORT", master_port))
    if torch.cuda.is_available():
        # Bind the rank to its GPU before any collective: NCCL puts a communicator on the current
        # device, which is cuda:0 for every rank until the engine sets it, and the watchdog's
        # all_gather_object runs before the engine exists.
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        fix_cuda_arch_list_for_deepspeed()  # before the engine JIT-builds FusedAdam
    # On CPU this may compile DeepSpeed's shm op (see smoe_ds.ops.prebuild): say so if it stalls,
    # and keep the op's allreduce off.
    with lock_watchdog(after_s=min(timeout_s, 120.0)), without_shm_allreduce():
        deepspeed.init_distributed(
            dist_backend=backend_name(),
            auto_mpi_discovery=True,
            distributed_port=port,
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
    # Under mpirun, DeepSpeed's MPI discovery numbers local ranks in rank order, but Open MPI may
    # place them otherwise (seen with --oversubscribe), and DeepSpeed's engine then refuses to
    # start. The MPI runtime's own local rank is the one that matches the process's placement.
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
    share_cpu_cores()


def local_world_size() -> int:
    """Ranks on this machine, as the launcher says (deepspeed, torchrun, mpirun); 1 if none does."""
    for var in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def share_cpu_cores() -> None:
    """Give each CPU rank its share of the machine's cores, unless OMP_NUM_THREADS is set.

    The deepspeed launcher and mpirun leave every rank at torch's default of one thread per core,
    so R ranks run R times as many threads as there are cores, and OpenMP's spinning workers fight
    over them: steps many times slower than with one thread per core each (docs/performance.md,
    "Measurements behind the code's choices").
    """
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world_size()))


# Rendezvous ports are drawn below the kernel's ephemeral range (Linux: 32768-60999 unless
# /proc/sys/net/ipv4/ip_local_port_range says otherwise). A port the kernel handed out with
# bind(0) is itself ephemeral, so between the check here and the launcher's bind an outgoing
# connection (gloo's pairs of a job running alongside) could take it: the clean-clone CI run of
# 2026-12-04 lost a test to EADDRINUSE that way. Below the range, only another bind can.
PORT_FLOOR = 20000


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now, below the ephemeral range where one
    is free there (else any free one): for a launcher's or a process group's rendezvous."""
    import random
    import socket

    top = _ephemeral_floor()
    draw = random.SystemRandom()  # not the seeded global generator: two seeded processes would draw alike
    candidates = draw.sample(range(PORT_FLOOR, top), min(64, top - PORT_FLOOR)) if top > PORT_FLOOR else []
    for port in [*candidates, 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def local_main_first():
    """Let local rank 0 do the work first (e.g. fill the datasets cache); the others then reuse it."""
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (returns a new tensor on ``t``'s device; ``t`` is left alone)."""
    t = t.detach().clone()
    if not (dist.is_initialized() and world_size() > 1):
        return t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        # NCCL reduces GPU tensors only: a CPU tensor (loss windows, NaN flags) goes via this rank's GPU.
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        return on_gpu.cpu()
    dist.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (dist.is_initialized() and world_size() > 1):
        return [obj]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
