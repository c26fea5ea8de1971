"""ZeRO-3 with SMoE-Dropout layers on 4 gloo ranks at ep_size 2: every weight partitioned (experts over
their expert-data-parallel group), training as under ZeRO-2, with and without optimizer offload.
Checkpoints are in test_zero3_checkpoints.py (its own file, so pytest-xdist runs the two on
different workers)."""

import json
import math

import pytest
import torch

from smoe_ds.checkpoint import read_model, resolve_tag_dir
from smoe_ds.config.schema import config_from_dict
from smoe_ds.models.lm import build_model
from tests.helpers.launch import run_ranks
from tests.helpers.resume_runs import args_for, losses

STEPS = 20
ZERO3 = "zero_optimization.stage=3"
FOUR_RANKS = ["train_micro_batch_size_per_gpu=4"]  # the global batch of the 2-rank runs of tests/resume_runs


def routers(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".gate." in k}


@pytest.fixture(scope="module")
def zero2_and_zero3(tmp_path_factory):
    """The same 20 steps on 4 ranks at ep_size 2, under ZeRO-2 and under ZeRO-3."""
    runs = {}
    for stage, extra in ((2, []), (3, [ZERO3])):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        proc = run_ranks("deepspeed", 4, args_for(out, f"run.max_steps={STEPS}", *FOUR_RANKS, *extra), module=True)
        runs[stage] = (out, proc)
    return runs


def test_zero3_gives_the_losses_of_zero2_and_the_router_stays_bit_identical(zero2_and_zero3):
    (out2, _), (out3, proc3) = zero2_and_zero3[2], zero2_and_zero3[3]
    assert "ZeRO stage 3" in proc3.stdout
    a, b = losses(out2), losses(out3)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    # The same arithmetic; ZeRO-3 reduce-scatters gradients where ZeRO-2 reduces them in buckets, so
    # float32 sums run in another order, and that rounding compounds over the steps (seen: 5e-7).
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, worst
    cfg2, state2, step2 = read_model(resolve_tag_dir(out2 / "checkpoints"))
    cfg3, state3, step3 = read_model(resolve_tag_dir(out3 / "checkpoints"))
    assert step2 == step3 == STEPS and state2.keys() == state3.keys()
    initial = build_model(cfg3.model, cfg3.moe, for_deepspeed=False).state_dict()
    r2, r3 = routers(state2), routers(state3)
    assert len(r3) == cfg3.model.n_layers
    assert all(torch.equal(r3[k], initial[k]) and torch.equal(r3[k], r2[k]) for k in r3)
    # and the trained weights really are the ZeRO-2 run's, to the same rounding
    assert max((state2[k] - state3[k]).abs().max().item() for k in state2) <= 1e-4


def test_each_rank_holds_the_share_zero3_promises(tmp_path):
    out = tmp_path / "shares.json"
    run_ranks("deepspeed", 4, ["tests.helpers.workers.zero3_shares", str(out), "2"], module=True)
    shares = {int(r): s for r, s in json.loads(out.read_text()).items()}
    experts = [n for n, s in shares[0].items() if s["expert"]]
    others = [n for n, s in shares[0].items() if not s["expert"]]
    assert len(experts) == 2 * 2 and any(".gate." in n for n in others)  # w_in, w_out per layer; routers
    for rank, mine in shares.items():
        for name, s in mine.items():
            if s["expert"]:  # this rank's N/ep_size experts, split over the ranks holding the same ones
                group, numel = [rank % 2, rank % 2 + 2], s["numel"]
            else:  # everything else, frozen routers included, over all ranks
                group, numel = [0, 1, 2, 3], s["numel"]
            assert s["group_ranks"] == group, (rank, name)
            assert s["local_numel"] == math.ceil(numel / len(group)), (rank, name)
    # an expert tensor holds only this expert-parallel rank's experts: half the global ones
    cfg = config_from_dict({"moe": {"num_experts": 4, "d_expert": 8}, "model": {"d_model": 32}}).moe
    w_in = next(n for n in experts if n.endswith("w_in"))
    assert shares[0][w_in]["numel"] == cfg.num_experts // 2 * cfg.d_expert * 32


def test_zero3_with_optimizer_offload_gives_the_losses_of_zero3(zero2_and_zero3, tmp_path):
    out3, _ = zero2_and_zero3[3]
    cpu_adam = ['zero_optimization.offload_optimizer={"device": "cpu"}', "optimizer.params.torch_adam=false"]
    proc = run_ranks(
        "deepspeed", 4, args_for(tmp_path, f"run.max_steps={STEPS}", *FOUR_RANKS, ZERO3, *cpu_adam), module=True
    )
    assert "ZeRO stage 3, DeepSpeedCPUAdam (optimizer state offloaded to the CPU)" in proc.stdout
    # DeepSpeedCPUAdam and torch's AdamW order their float operations differently (as at ZeRO-2,
    # tests/distributed/test_offload.py): rounding that accumulates over the steps.
    a, b = losses(out3), losses(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, worst


def test_thor_two_passes_and_random_routing_under_zero3_give_the_losses_of_zero2(tmp_path):
    """THOR runs two forwards per batch and draws its routes from the RNG: ZeRO-3's recorded fetch
    order and the RNG stream must both hold up (2 ranks, ep_size 2, 6 steps)."""
    thor = ["moe.mode=thor", "run.max_steps=6"]
    run_ranks("deepspeed", 2, args_for(tmp_path / "z2", *thor), module=True)
    run_ranks("deepspeed", 2, args_for(tmp_path / "z3", *thor, ZERO3), module=True)
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, worst
