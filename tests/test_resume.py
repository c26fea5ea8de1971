"""Killed runs resume exactly; saves are crash-safe; resuming at another world size is announced."""

import csv
import os
import signal
import subprocess
import time

import pytest

from smoe_ds.checkpoint import latest_tag
from smoe_ds.distributed import free_port

from .launch import REPO, launcher_command, run_ranks

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
    out = tmp_path_factory.mktemp("whole")
    run_ranks("deepspeed", 2, args_for(out), module=True)
    return losses(out)


def start_and_kill(out_dir, until) -> None:
    """Launch 2 ranks with the deepspeed launcher and SIGKILL rank 1 once ``until(out_dir)`` holds."""
    port = free_port()
    cmd = launcher_command("deepspeed", 2, args_for(out_dir), port, module=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def test_sigkill_mid_training_then_relaunch_gives_the_uninterrupted_losses(uninterrupted, tmp_path):
    start_and_kill(tmp_path, logged_past(75))  # checkpoints at 30 and 60 exist; 61..75+ are lost
    assert latest_tag(tmp_path / "checkpoints") == "step60"
    proc = run_ranks("deepspeed", 2, args_for(tmp_path), module=True)
    assert "resumed from" in proc.stdout and "step60" in proc.stdout
    resumed = losses(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted)
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted)
    assert worst <= 1e-6, worst
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step120", "step90"]  # keep_last=2


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(uninterrupted, tmp_path):
    start_and_kill(tmp_path, lambda out: (out / "checkpoints" / "step60").exists())
    tag = latest_tag(tmp_path / "checkpoints")
    assert tag in ("step30", "step60")  # step60 only if its save finished before the kill landed
    run_ranks("deepspeed", 2, args_for(tmp_path), module=True)
    resumed = losses(tmp_path)
    assert max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted) <= 1e-6


@pytest.mark.parametrize(
    "launcher, world, ep, micro", [("python", 1, 1, 16), ("deepspeed", 4, 2, 4), ("deepspeed", 4, 4, 4)]
)
def test_resume_at_another_world_size_reshards_weights_and_optimizer_exactly(
    uninterrupted, tmp_path, launcher, world, ep, micro
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
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in range(31, 41))
    assert worst <= 1e-5, worst


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
