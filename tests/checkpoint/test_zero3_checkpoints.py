"""ZeRO-3 checkpoints on 4 gloo ranks at ep_size 2: exact resume after a kill, resuming across stages
and layouts with bit-identical weights, and the fp32 masters of a bf16 run in the whole-model files."""

import subprocess

import torch

from smoe_ds.checkpoint import latest_tag, read_model, resolve_tag_dir
from smoe_ds.distributed.process_group import free_port
from tests.distributed.test_zero3 import FOUR_RANKS, ZERO3
from tests.helpers.launch import REPO, kill_tree, launcher_command, rank_env, run_ranks
from tests.helpers.resume_runs import args_for, losses


def test_zero3_checkpoint_reshards_to_zero2_on_2_ranks_and_back_bit_for_bit(tmp_path):
    """ZeRO-3 (4 ranks) -> ZeRO-2 (2 ranks) -> ZeRO-3 (4 ranks, another partitioning), each resumed and
    saved again at once: the weights, fp32 masters and Adam moments are the same bits every time."""
    from safetensors.torch import load_file

    from smoe_ds.checkpoint import read_meta, read_zero_state
    from smoe_ds.checkpoint.export import convert
    from smoe_ds.checkpoint.read import saved_config

    run = args_for(tmp_path, "run.max_steps=6", *FOUR_RANKS, ZERO3)
    run_ranks("deepspeed", 4, run, module=True)
    to_zero2 = [*run[1:], "--set", "zero_optimization.stage=2", "--set", "train_micro_batch_size_per_gpu=8"]
    to_2 = run_ranks("deepspeed", 2, ["tests.helpers.workers.resave", str(tmp_path / "z2"), *to_zero2], module=True)
    assert "ZeRO-3) on world size 2, ep_size 2, ZeRO-2: weights, fp32 master weights" in to_2.stdout
    back = [*to_zero2, "--set", f"run.out_dir={tmp_path / 'back'}", "--set", ZERO3, "--set", FOUR_RANKS[0]]
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "checkpoints").symlink_to(tmp_path / "z2")
    to_3 = run_ranks("deepspeed", 4, ["tests.helpers.workers.resave", str(tmp_path / "z3"), *back], module=True)
    assert "ZeRO-2) on world size 4, ep_size 2, ZeRO-3: weights, fp32 master weights" in to_3.stdout
    folders = [resolve_tag_dir(f) for f in (tmp_path / "checkpoints", tmp_path / "z2", tmp_path / "z3")]
    exports, states = [], []
    for i, tag in enumerate(folders):
        convert(tag, tmp_path / f"export{i}")
        exports.append(load_file(tmp_path / f"export{i}" / "model.safetensors"))
        meta = read_meta(tag)
        states.append(read_zero_state(tag, saved_config(meta["config"], tag), meta["world_size"]))
    for export, state in zip(exports[1:], states[1:]):
        assert export.keys() == exports[0].keys() and all(torch.equal(export[k], exports[0][k]) for k in export)
        for field in ("fp32", "exp_avg", "exp_avg_sq"):
            assert state[field].keys() == states[0][field].keys() and len(state[field]) > 0, field
            assert all(torch.equal(state[field][k], states[0][field][k]) for k in state[field]), field
        assert torch.equal(state["step"]["step"], states[0]["step"]["step"])
    # and the restored engines computed with those weights from the start (the first step after a
    # resume uses them): the same validation loss at both stages, to float32 rounding
    after = [float(p.stdout.split("validation loss after the restore: ")[1].split()[0]) for p in (to_2, to_3)]
    assert abs(after[0] - after[1]) <= 1e-6, after


def test_zero3_sigkill_mid_training_then_relaunch_gives_the_uninterrupted_losses(tmp_path):
    """24 steps with dropout and a save every 8; rank 3 is killed at step 14 and the relaunch
    resumes from step 8 with everything (partitions, optimizer shards, RNG) restored."""
    run = ["run.max_steps=24", "run.save_interval=8", "model.dropout=0.1", *FOUR_RANKS, ZERO3]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_ranks("deepspeed", 4, args_for(whole, *run), module=True)
    port = free_port()
    cmd = launcher_command("deepspeed", 4, args_for(cut, *run), port, module=True)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=rank_env({"SMOE_DS_INJECT_FAULT": "kill:3:train:14"}),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.wait(timeout=400) != 0
    finally:
        kill_tree(proc.pid)
    assert latest_tag(cut / "checkpoints") == "step8"
    resumed = run_ranks("deepspeed", 4, args_for(cut, *run), module=True)
    assert f"resumed from {cut / 'checkpoints' / 'step8'}" in resumed.stdout
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-6, worst


def test_a_bf16_zero3_checkpoint_holds_the_fp32_masters_and_exports_them(tmp_path):
    from safetensors.torch import load_file

    from smoe_ds.checkpoint.export import convert

    bf16 = args_for(tmp_path, "run.max_steps=5", "bf16.enabled=true", *FOUR_RANKS, ZERO3)
    run_ranks("deepspeed", 4, bf16, module=True)
    _, state, _ = read_model(resolve_tag_dir(tmp_path / "checkpoints"))
    convert(tmp_path / "checkpoints", tmp_path / "export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    qkv = "blocks.0.attn.qkv.weight"
    expert = "blocks.0.ffn.deepspeed_moe.experts.deepspeed_experts.3.w_in.weight"
    for name in (qkv, expert):
        # fp32 bits that bf16 cannot hold: the masters, not the bf16 weights the engine ran with
        assert state[name].dtype == torch.float32, name
        assert not torch.equal(state[name], state[name].bfloat16().float()), name
    assert torch.equal(exported[f"lm.{qkv}"], state[qkv])
    assert torch.equal(exported["lm.blocks.0.ffn.deepspeed_moe.experts.w_in"][3], state[expert])
