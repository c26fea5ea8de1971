"""Killed runs resume exactly; saves are crash-safe; damaged or foreign checkpoints are refused.

Resuming at another world size or ep_size is in test_reshard.py (its own file, so that pytest-xdist
runs the two groups of long runs on different workers)."""

import json
import os
import signal
import subprocess
import time

import pytest

from smoe_ds.checkpoint import latest_tag
from smoe_ds.checkpoint.files import read_meta
from smoe_ds.distributed.process_group import free_port
from tests.helpers.launch import REPO, launcher_command, rank_env, run_ranks
from tests.helpers.resume_runs import STEPS, args_for, losses

# The kill tests make everything a resume must restore matter: dropout draws from the RNG,
# log lines average 7 steps (so a window spans each save), and one micro-batch is skipped
# as NaN at step 20 (so the data position is more than the step count).
KILL_RUN = ["model.dropout=0.1", "run.log_interval=7"]
NAN_AT_20 = {"SMOE_DS_INJECT_FAULT": "nan:1:train:20:1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill tests' reference: 120 steps with dropout, 7-step log windows and one NaN skip."""
    out = tmp_path_factory.mktemp("whole")
    run_ranks("deepspeed", 2, args_for(out, *KILL_RUN), module=True, env=NAN_AT_20)
    logged = losses(out)
    assert sorted(logged) == [*range(7, STEPS, 7), STEPS]
    return logged


def start_and_kill(out_dir, until=None, env=None) -> None:
    """Launch 2 ranks with the deepspeed launcher (the kill tests' run, with one NaN at step 20)
    and SIGKILL rank 1 once ``until(out_dir)`` holds, or wait for an injected fault to end it."""
    port = free_port()
    cmd = launcher_command("deepspeed", 2, args_for(out_dir, *KILL_RUN), port, module=True)
    env = rank_env({**NAN_AT_20, **(env or {})})
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if until is None:
        assert proc.wait(timeout=300) != 0
        return
    deadline = time.time() + 300
    while not until(out_dir):
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.01)
    rank1 = subprocess.run(["pgrep", "-f", f"local_rank=1.*run.out_dir={out_dir}"], capture_output=True, text=True)
    pids = [int(p) for p in rank1.stdout.split()]
    assert pids, "rank 1 not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=180) != 0


def logged_past(step):
    def check(out_dir):
        try:
            return max(losses(out_dir), default=0) >= step
        except (ValueError, OSError):
            return False

    return check


def relaunch_and_compare(out_dir, expected_tag, uninterrupted) -> None:
    """Relaunch the killed run (no faults now): it resumes from ``expected_tag`` and logs the
    uninterrupted run's losses at every step, to 1e-6."""
    carried_s = read_meta(out_dir / "checkpoints" / expected_tag)["trainer_state"]["train_wall_s"]
    proc = run_ranks("deepspeed", 2, args_for(out_dir, *KILL_RUN), module=True)
    assert f"resumed from {out_dir / 'checkpoints' / expected_tag}" in proc.stdout
    # The training time counts the steps before the kill too, not only this sitting's.
    assert 0 < carried_s < json.loads((out_dir / "train_summary.json").read_text())["train_wall_s"]
    resumed = losses(out_dir)
    assert sorted(resumed) == sorted(uninterrupted)
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted)
    assert worst <= 1e-6, worst


def test_sigkill_mid_training_then_relaunch_gives_the_uninterrupted_losses(uninterrupted, tmp_path):
    start_and_kill(tmp_path, logged_past(70))  # checkpoints at 30 and 60 exist; 61..70+ are lost
    assert latest_tag(tmp_path / "checkpoints") == "step60"
    relaunch_and_compare(tmp_path, "step60", uninterrupted)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step120", "step90"]  # keep_last=2


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(uninterrupted, tmp_path):
    # Rank 1 dies inside the save of step 60, after writing its shards, before the pointer moves.
    start_and_kill(tmp_path, env={"SMOE_DS_INJECT_FAULT": "nan:1:train:20:1,kill:1:save:60"})
    ckpts = tmp_path / "checkpoints"
    assert latest_tag(ckpts) == "step30" and (ckpts / "step60.partial").is_dir() and not (ckpts / "step60").exists()
    relaunch_and_compare(tmp_path, "step30", uninterrupted)
    assert not list(ckpts.glob("*.partial"))


def test_a_save_that_replaces_the_same_step_keeps_a_complete_checkpoint(tmp_path):
    """run.resume=false in a used folder: the new step-30 save replaces the old one, and a kill
    in the middle still leaves a checkpoint to resume from."""
    quick = ["run.max_steps=30", "moe.ep_size=1"]
    run_ranks("python", 1, args_for(tmp_path, *quick), module=True)
    ckpts = tmp_path / "checkpoints"
    first = (ckpts / "step30" / "smoe_ds_meta.json").stat().st_mtime_ns
    again = args_for(tmp_path, *quick, "run.resume=false")
    killed = run_ranks("python", 1, again, module=True, check=False, env={"SMOE_DS_INJECT_FAULT": "kill:0:save:30"})
    assert killed.returncode != 0
    assert latest_tag(ckpts) == "step30" and (ckpts / "step30" / "smoe_ds_meta.json").stat().st_mtime_ns == first
    run_ranks("python", 1, again, module=True)
    assert latest_tag(ckpts) == "step30" and (ckpts / "step30" / "smoe_ds_meta.json").stat().st_mtime_ns != first
    assert not list(ckpts.glob("*.partial"))


def test_resume_folder_of_a_different_model_is_refused(tmp_path):
    run_ranks("python", 1, args_for(tmp_path, "run.max_steps=2", "moe.ep_size=1"), module=True)
    proc = run_ranks("python", 1, args_for(tmp_path, "moe.ep_size=1", "moe.d_expert=16"), module=True, check=False)
    assert proc.returncode == 2
    assert "was written by a different model (moe.d_expert: 32 in the checkpoint vs 16 now)" in proc.stderr


def test_partial_tag_without_pointer_is_ignored(tmp_path):
    run_ranks("python", 1, args_for(tmp_path, "run.max_steps=30", "moe.ep_size=1"), module=True)
    partial = tmp_path / "checkpoints" / "step60"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert latest_tag(tmp_path / "checkpoints") == "step30"
    proc = run_ranks("python", 1, args_for(tmp_path, "run.max_steps=31", "moe.ep_size=1"), module=True)
    assert "resumed from" in proc.stdout and "step30" in proc.stdout


def test_damaged_checkpoint_stops_the_resume_with_one_line_naming_the_file(tmp_path):
    run_ranks("python", 1, args_for(tmp_path, "run.max_steps=30", "moe.ep_size=1"), module=True)
    expert = tmp_path / "checkpoints" / "step30" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:50])
    proc = run_ranks("python", 1, args_for(tmp_path, "run.max_steps=31", "moe.ep_size=1"), module=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "smoe-ds: error: cannot read checkpoint file " in proc.stderr
    assert "step30/layer_1_expert_2_mp_rank_00_model_states.pt" in proc.stderr
    expert.unlink()
    proc = run_ranks("python", 1, args_for(tmp_path, "run.max_steps=31", "moe.ep_size=1"), module=True, check=False)
    assert proc.returncode == 2 and "missing checkpoint file: " in proc.stderr
    assert "layer_1_expert_2_mp_rank_00_model_states.pt" in proc.stderr
