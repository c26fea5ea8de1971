"""Killed runs resume exactly; saves are crash-safe; resuming at another world size is announced."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from smoe_ds.checkpoint import latest_tag
from smoe_ds.distributed import free_port

from .launch import REPO, launcher_command, rank_env, run_ranks

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
STEPS = 120
COMMON = [
    f"run.max_steps={STEPS}",
    "run.save_interval=30",
    "run.keep_last=2",
    "run.log_interval=1",
    "run.eval_interval=0",
    f"moe.k_schedule.end_step={STEPS}",  # fixed, so every run agrees whatever its max_steps
    f"scheduler.params.total_num_steps={STEPS}",
]
# The kill tests make everything a resume must restore matter: dropout draws from the RNG,
# log lines average 7 steps (so a window spans each save), and one micro-batch is skipped
# as NaN at step 20 (so the data position is more than the step count).
KILL_RUN = ["model.dropout=0.1", "run.log_interval=7"]
NAN_AT_20 = {"SMOE_DS_INJECT_FAULT": "nan:1:train:20:1"}


def args_for(out_dir, *extra):
    sets = [*COMMON, f"run.out_dir={out_dir}", *extra]
    return ["smoe_ds.train", "--config", CONFIG] + sum([["--set", s] for s in sets], [])


def losses(out_dir) -> dict[int, float]:
    """Step -> logged training loss; a step logged twice (before a kill and after) keeps the last."""
    (path,) = (out_dir / "monitor").rglob("Train_loss.csv")
    rows = [r for r in csv.reader(open(path)) if r and r[0] != "step"]
    return {int(float(r[0])): float(r[1]) for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill tests' reference: 120 steps with dropout, 7-step log windows and one NaN skip."""
    out = tmp_path_factory.mktemp("whole")
    run_ranks("deepspeed", 2, args_for(out, *KILL_RUN), module=True, env=NAN_AT_20)
    logged = losses(out)
    assert sorted(logged) == [*range(7, STEPS, 7), STEPS]
    return logged


@pytest.fixture(scope="module")
def uninterrupted_40(tmp_path_factory):
    """The resharding tests' reference: 40 steps, no dropout (a new layout starts fresh RNGs)."""
    out = tmp_path_factory.mktemp("whole40")
    run_ranks("deepspeed", 2, args_for(out, "run.max_steps=40"), module=True)
    return losses(out)


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
    proc = run_ranks("deepspeed", 2, args_for(out_dir, *KILL_RUN), module=True)
    assert f"resumed from {out_dir / 'checkpoints' / expected_tag}" in proc.stdout
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


@pytest.mark.parametrize(
    "launcher, world, ep, micro",
    [
        ("python", 1, 1, 16),
        ("deepspeed", 4, 2, 4),
        pytest.param("deepspeed", 4, 4, 4, marks=pytest.mark.slow),
    ],
)
def test_resume_at_another_world_size_reshards_weights_and_optimizer_exactly(
    uninterrupted_40, tmp_path, launcher, world, ep, micro
):
    run_ranks("deepspeed", 2, args_for(tmp_path, "run.max_steps=30"), module=True)
    proc = run_ranks(
        launcher,
        world,
        args_for(tmp_path, "run.max_steps=40", f"moe.ep_size={ep}", f"train_micro_batch_size_per_gpu={micro}"),
        module=True,
    )
    assert "fp32 master weights, Adam moments and the LR schedule resharded exactly" in proc.stdout
    # The data order does not depend on the world size when the global batch is the same, so the
    # resumed steps see the same tokens; only the order of floating-point sums differs.
    resumed = losses(tmp_path)
    worst = max(abs(resumed[s] - uninterrupted_40[s]) for s in range(31, 41))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("zero, world, ep", [(2, 4, 2), pytest.param(1, 4, 4, marks=pytest.mark.slow), (1, 1, 1)])
def test_resharded_weights_and_optimizer_state_are_bit_identical(tmp_path, zero, world, ep):
    """Save on 2 ranks with ep_size 2, resume at another layout, save again untrained: the
    weights (every expert by global id) and the fp32 masters and Adam moments are the same bits."""
    from safetensors.torch import load_file

    from smoe_ds.checkpoint import read_zero_state, resolve_tag_dir
    from smoe_ds.config import config_from_dict
    from smoe_ds.convert import convert

    run = args_for(tmp_path, "run.max_steps=6", f"zero_optimization.stage={zero}")
    run_ranks("deepspeed", 2, run, module=True)
    moved = [*run[1:], "--set", f"moe.ep_size={ep}", "--set", f"train_micro_batch_size_per_gpu={16 // world}"]
    proc = run_ranks("deepspeed", world, ["tests.workers.resave", str(tmp_path / "again"), *moved], module=True)
    assert "resharded exactly" in proc.stdout
    before, after = resolve_tag_dir(tmp_path / "checkpoints"), resolve_tag_dir(tmp_path / "again")
    convert(before, tmp_path / "a")
    convert(after, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    za, zb = (
        read_zero_state(
            tag, config_from_dict(json.loads((tag / "smoe_ds_meta.json").read_text())["config"]).resolve(), w
        )
        for tag, w in ((before, 2), (after, world))
    )
    for field in ("fp32", "exp_avg", "exp_avg_sq"):
        assert za[field].keys() == zb[field].keys() and len(za[field]) > 0
        assert all(torch.equal(za[field][key], zb[field][key]) for key in za[field]), field


@pytest.mark.slow
def test_zero0_resume_at_another_world_size_reshards_exactly_and_a_stage_change_is_announced(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    zero0 = "zero_optimization.stage=0"
    run_ranks("deepspeed", 2, args_for(whole, "run.max_steps=36", zero0), module=True)
    run_ranks("deepspeed", 2, args_for(cut, "run.max_steps=30", zero0), module=True)
    # 4 ranks keep ep_size 2: under ZeRO-0 DeepSpeed scales expert gradients by the ep_size, so
    # only a run with the same ep_size can follow the uninterrupted one step for step.
    proc = run_ranks(
        "deepspeed", 4, args_for(cut, "run.max_steps=36", zero0, "train_micro_batch_size_per_gpu=4"), module=True
    )
    assert "Adam moments and the LR schedule resharded exactly" in proc.stdout
    worst = max(abs(losses(cut)[s] - losses(whole)[s]) for s in range(31, 37))
    assert worst <= 1e-5, worst
    # ZeRO-0 shards cannot feed a ZeRO-2 optimizer: weights come back, the optimizer reset is announced
    proc = run_ranks("deepspeed", 2, args_for(cut, "run.max_steps=37"), module=True)
    assert "resuming step36" in proc.stdout and "is RESET" in proc.stdout


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
