"""Start ranks the way users do: the deepspeed launcher, torchrun or mpirun.

Each call picks its own free port, so tests never collide with each other or with a
leftover process. Output is captured and shown when the run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smoe_ds.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = Path(__file__).resolve().parent / "workers"
SHARED_DATA = REPO.parent / "shared" / "data"


def launcher_command(launcher: str, nprocs: int, target: list[str], port: int, module: bool) -> list[str]:
    """The argv that starts ``target`` (a script path or ``-m module``) on ``nprocs`` local ranks."""
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port)]
        return head + (["--module"] if module else []) + target
    if launcher == "torchrun":
        head = [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(port)]
        return head + (["-m"] if module else []) + target
    if launcher == "mpirun":
        head = [
            str(BIN / "mpirun"),
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nprocs),
            "-x",
            f"MASTER_PORT={port}",
            "-x",
            "PATH",
            sys.executable,
        ]
        return head + (["-m"] if module else []) + target
    if launcher == "python":
        return [sys.executable] + (["-m"] if module else []) + target
    raise ValueError(launcher)


def run_ranks(
    launcher: str,
    nprocs: int,
    target: list[str],
    *,
    module: bool = False,
    timeout: float = 600,
    cwd: Path = REPO,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run and wait; with ``check`` a non-zero exit fails the test and prints the output tail."""
    port = free_port()
    full_env = {
        **os.environ,
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    cmd = launcher_command(launcher, nprocs, target, port, module)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def run_worker(launcher: str, nprocs: int, worker: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_ranks(launcher, nprocs, [str(WORKERS / worker), *args], **kw)
