"""Resuming at another world size or ep_size: weights and optimizer state resharded exactly."""

import json

import pytest
import torch

from tests.helpers.launch import run_ranks
from tests.helpers.resume_runs import args_for, losses


@pytest.fixture(scope="module")
def uninterrupted_40(tmp_path_factory):
    """The resharding tests' reference: 40 steps, no dropout (a new layout starts fresh RNGs)."""
    out = tmp_path_factory.mktemp("whole40")
    run_ranks("deepspeed", 2, args_for(out, "run.max_steps=40"), module=True)
    return losses(out)


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
    from smoe_ds.checkpoint.export import convert
    from smoe_ds.config.schema import config_from_dict

    run = args_for(tmp_path, "run.max_steps=6", f"zero_optimization.stage={zero}")
    run_ranks("deepspeed", 2, run, module=True)
    moved = [*run[1:], "--set", f"moe.ep_size={ep}", "--set", f"train_micro_batch_size_per_gpu={16 // world}"]
    proc = run_ranks("deepspeed", world, ["tests.helpers.workers.resave", str(tmp_path / "again"), *moved], module=True)
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
