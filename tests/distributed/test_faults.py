"""Faults on real multi-rank runs: dead or hung ranks end the whole job in bounded time, naming the
rank; NaN losses are skipped and then stop the run; two simulated nodes train, save and resume.

"Nodes" are two torchrun agents (node_rank 0 and 1) on 127.0.0.1 sharing one master port, one
rank each, so the expert-parallel group (ep_size 2) spans both. Faults are injected with
SMOE_DS_INJECT_FAULT (smoe_ds/distributed/faults.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smoe_ds.distributed.process_group import free_port
from tests.helpers.launch import REPO, kill_tree, run_ranks, start_torchrun_node

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
DEAD_AFTER_S = 8  # run.dead_rank_timeout_s in these tests (the default is 120)
# Death -> every rank gone. What is checked is that the heartbeat or the broken connection ends
# the survivors, not the 600 s collective timeout (run.collective_timeout_s's default), which is
# what a hang would wait for; the bound leaves a loaded 2-core machine minutes, not seconds.
BOUND_S = 180


def train_args(out: Path, *sets: str) -> list[str]:
    sets = (
        f"run.out_dir={out}",
        "run.heartbeat_interval_s=1",
        f"run.dead_rank_timeout_s={DEAD_AFTER_S}",
        "run.eval_interval=0",
        "run.final_eval_batches=2",
        *sets,
    )
    return ["smoe_ds.train", "--config", CONFIG] + [a for s in sets for a in ("--set", s)]


class Nodes:
    """Two simulated nodes running one job; records when each agent exits."""

    def __init__(self, args: list[str], env: dict | None = None):
        port = free_port()
        self.procs = [start_torchrun_node(n, 2, 1, port, args, env) for n in (0, 1)]
        self.exit_time: list[float | None] = [None, None]
        self.output = ["", ""]
        self._threads = [threading.Thread(target=self._collect, args=(n,)) for n in (0, 1)]
        for t in self._threads:
            t.start()

    def _collect(self, n: int) -> None:
        self.output[n] = self.procs[n].stdout.read()
        self.procs[n].wait()
        self.exit_time[n] = time.monotonic()

    def wait(self, node: int, timeout: float) -> None:
        self._threads[node].join(timeout)
        if self._threads[node].is_alive():
            self.kill_all()
            raise AssertionError(f"node {node} still running after {timeout}s:\n{self.output}")

    def kill_all(self) -> None:
        for p in self.procs:
            kill_tree(p.pid)
        for t in self._threads:
            t.join(30)

    @property
    def returncodes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]


@pytest.mark.slow
def test_two_nodes_train_save_and_resume_with_an_expert_group_spanning_both(tmp_path):
    out = tmp_path / "run"
    first = Nodes(train_args(out, "run.max_steps=6", "run.save_interval=3"))
    first.wait(0, 300)
    first.wait(1, 60)
    assert first.returncodes == [0, 0], first.output
    assert "ep_size 2" in first.output[0] and (out / "checkpoints" / "latest").read_text().strip() == "step6"
    layout = json.loads((out / "layout.json").read_text())
    assert layout["expert_parallel_groups"] == [[0, 1]] and layout["experts_of_rank"] == [[0, 1], [2, 3]]

    second = Nodes(train_args(out, "run.max_steps=9", "run.save_interval=3"))
    second.wait(0, 300)
    second.wait(1, 60)
    assert second.returncodes == [0, 0], second.output
    assert f"resumed from {out / 'checkpoints' / 'step6'}" in second.output[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["history"][-1]["step"] == 9


@pytest.mark.parametrize(
    "fault, dead",
    [
        pytest.param("kill:1:train:4", 1, id="train"),
        pytest.param("kill:1:eval", 1, id="eval", marks=pytest.mark.slow),
        pytest.param("kill:1:save:3", 1, id="save", marks=pytest.mark.slow),
        pytest.param("kill:0:train:4", 0, id="rank0"),
    ],
)
def test_a_killed_rank_ends_every_rank_within_the_bound_naming_it(tmp_path, fault, dead):
    out = tmp_path / "run"
    sets = ["run.max_steps=8", "run.save_interval=3"] + (["run.eval_interval=100"] if "eval" in fault else [])
    nodes = Nodes(train_args(out, *sets), env={"SMOE_DS_INJECT_FAULT": fault})
    survivor = 1 - dead
    nodes.wait(dead, 300)
    nodes.wait(survivor, BOUND_S)
    took = nodes.exit_time[survivor] - nodes.exit_time[dead]
    print(f"{fault}: rank {survivor} exited {took:.1f}s after rank {dead} died")
    assert nodes.returncodes[dead] != 0 and nodes.returncodes[survivor] != 0
    assert took <= BOUND_S
    errors = [line for line in nodes.output[survivor].splitlines() if line.startswith("smoe-ds: error:")]
    expected = "rank 1 (on " if dead == 1 else "lost the job's rendezvous store"
    assert len(errors) == 1 and expected in errors[0], nodes.output[survivor][-4000:]
    if "save" in fault:  # the interrupted save never became the latest checkpoint
        assert not (out / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_hung_rank_is_found_by_the_heartbeat_within_the_timeout(tmp_path):
    # SIGSTOP keeps the rank's sockets open, so no collective fails: only the heartbeat can tell.
    nodes = Nodes(train_args(tmp_path / "run", "run.max_steps=8"), env={"SMOE_DS_INJECT_FAULT": "hang:1:train:4"})
    try:
        start = time.monotonic()
        nodes.wait(0, 300)
        assert nodes.returncodes[0] != 0  # torchrun reports the rank's own exit code (3) and exits 1
        errors = [line for line in nodes.output[0].splitlines() if line.startswith("smoe-ds: error:")]
        silent = f"rank 1 (on {os.uname().nodename}) sent no heartbeat for {DEAD_AFTER_S}s"
        assert len(errors) == 1 and silent in errors[0]
        print(f"hung rank: rank 0 exited {nodes.exit_time[0] - start:.1f}s after the job started")
    finally:
        nodes.kill_all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_losses_are_skipped_then_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, precision):
    out = tmp_path / "run"
    # A transient NaN (2 micro-batches on rank 1 at step 2) is skipped on both ranks and the run finishes.
    args = ["run.max_steps=5", "run.save_interval=3", "run.max_bad_steps=3", "run.log_interval=5"]
    args.append(f"bf16.enabled={precision == 'bf16'}".lower())
    transient = run_ranks(
        "torchrun", 2, train_args(out, *args), module=True, env={"SMOE_DS_INJECT_FAULT": "nan:1:train:2:2"}
    )
    assert "smoe-ds: error" not in transient.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["history"][-1]["skipped_steps"] == 2 and summary["history"][-1]["step"] == 5
    # A lasting NaN from step 7 on stops the run with exit code 4 after 3 bad micro-batches in a row.
    lasting = run_ranks(
        "torchrun",
        2,
        train_args(out, *args[-1:], "run.max_steps=10", "run.save_interval=3", "run.max_bad_steps=3"),
        module=True,
        check=False,
        env={"SMOE_DS_INJECT_FAULT": "nan:1:train:7"},
    )
    errors = [line for line in lasting.stderr.splitlines() if line.startswith("smoe-ds: error:")]
    assert lasting.returncode != 0 and len(errors) == 1, lasting.stderr[-4000:]
    assert "NaN/inf 3 times in a row" in errors[0] and "on rank(s) 1" in errors[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step6'}" in errors[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"


def test_a_stale_extension_build_lock_is_named_instead_of_hanging_silently(tmp_path):
    # A process killed while DeepSpeed JIT-builds its CPU op leaves `lock` behind, and torch waits on
    # it forever. Start-up must say which file to delete. (The wait itself is torch's; the test stops it.)
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    args = train_args(tmp_path / "run", "run.collective_timeout_s=5")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env={**os.environ, **env}, stderr=err)
    try:
        deadline, seen = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "delete it" not in seen:
            time.sleep(0.5)
            seen = log.read_text()
        assert f"start-up has waited 5s on {ext / 'deepspeed_shm_comm' / 'lock'}" in seen, seen[-3000:]
        assert "delete it" in seen
    finally:
        kill_tree(proc.pid)
        proc.wait()
