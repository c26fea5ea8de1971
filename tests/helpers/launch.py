"""Start ranks the way users do: the deepspeed launcher, torchrun or mpirun.

Each call picks its own free port, so tests never collide with each other or with a
leftover process. Output is captured and shown when the run fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from smoe_ds.distributed.process_group import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKERS = Path(__file__).resolve().parent / "workers"


def tool(name: str) -> str:
    """A launcher installed with this interpreter, else the one on PATH: where packages were
    installed with ``pip --target`` (make gpu-check), their commands are not beside python."""
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name) or str(beside)


def launcher_command(launcher: str, nprocs: int, target: list[str], port: int, module: bool) -> list[str]:
    """The argv that starts ``target`` (a script path or ``-m module``) on ``nprocs`` local ranks."""
    if launcher == "deepspeed":
        head = [tool("deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port)]
        return head + (["--module"] if module else []) + target
    if launcher == "torchrun":
        head = [tool("torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(port)]
        return head + (["-m"] if module else []) + target
    if launcher == "mpirun":
        head = [
            tool("mpirun"),
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


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it. Launchers (torchrun) may start ranks in
    sessions of their own, so killing the launcher's process group is not enough; SIGKILL also
    ends a stopped (SIGSTOP) rank."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


_ops_built = False


def ensure_ops_built() -> None:
    """Compile DeepSpeed's CPU shm op (and smoe_ds's CPU experts op) once per test process, before it
    first starts ranks: ranks that all compile it at once under a test timeout can be killed
    mid-build and leave a stale lock. A few seconds once it is built; about a minute the first time.
    Tests that start no ranks never pay for it (tests/conftest.py's ``deepspeed_ops_built`` is the
    same for a test that starts DeepSpeed in its own process)."""
    global _ops_built
    if not _ops_built:
        from smoe_ds.ops.prebuild import prebuild

        prebuild()
        _ops_built = True


def rank_env(extra: dict | None = None) -> dict:
    """The environment tests start ranks with: one thread each, offline, unbuffered, plus ``extra``.
    Every way tests start ranks takes it (run_ranks, start_torchrun_node, and ranks started by hand),
    so the ops are built here first (``ensure_ops_built``)."""
    ensure_ops_built()
    quiet = {"OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {**os.environ, **quiet, **(extra or {})}


def failure(cmd: list[str], what: str, stdout: str, stderr: str) -> str:
    return f"{' '.join(cmd)} {what}\n--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}"


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
    full_env = rank_env({"MASTER_PORT": str(port), **(env or {})})
    cmd = launcher_command(launcher, nprocs, target, port, module)
    # A session of its own, so a timeout kills the launcher *and* its ranks, not the launcher only.
    with subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(popen.pid)
            stdout, stderr = popen.communicate()
            raise AssertionError(failure(cmd, f"ran past {timeout}s", stdout, stderr)) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(failure(cmd, f"exited {proc.returncode}", proc.stdout, proc.stderr))
    return proc


def run_worker(launcher: str, nprocs: int, worker: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_ranks(launcher, nprocs, [str(WORKERS / worker), *args], **kw)


def start_torchrun_node(
    node_rank: int, nnodes: int, nproc: int, port: int, target: list[str], env: dict | None = None
) -> subprocess.Popen:
    """One simulated node: a torchrun agent with ``node_rank``, all nodes sharing 127.0.0.1:``port``.

    Started in a session of its own; stop it with ``kill_tree``. stdout and stderr go to one pipe.
    """
    cmd = [
        tool("torchrun"),
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        *target,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=rank_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
