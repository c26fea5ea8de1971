"""The frozen router on real engines: identical everywhere, in no optimizer group, never changes.
Every flag is reduced over the ranks before rank 0 writes it: true only if true on every rank (or,
for the ones that must be false, true if true on any rank).

torchrun --nproc_per_node N -m tests.helpers.workers.router OUT.json EP_SIZE ZERO_STAGE
"""

from __future__ import annotations

import os

import deepspeed
import torch

from smoe_ds.models.lm import build_model
from smoe_ds.moe.layer import moe_layers
from smoe_ds.moe.router import frozen_router_weight
from smoe_ds.ops.prebuild import shm_buffers
from smoe_ds.training.runtime import optimizer_param_groups
from tests.helpers.workers.common import (
    all_gather_cat,
    finish,
    on_any_rank,
    on_every_rank,
    ranks_reporting,
    start,
    tiny_config,
    train_random_steps,
    worker_args,
)


def optimizer_params(engine) -> set[int]:
    """ids of every parameter any optimizer group (or ZeRO's fp16/bf16 group list) holds."""
    opt = engine.optimizer
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for groups in (getattr(opt, "bit16_groups", None) or [], getattr(opt, "round_robin_bit16_groups", None) or []):
        held |= {id(p) for g in groups for p in g}
    return held


def main(out: str, ep_size: int, zero_stage: int) -> None:
    rank, world = start()
    cfg = tiny_config(ep_size=ep_size, zero_stage=zero_stage)
    model = build_model(cfg.model, cfg.moe, ep_rank=rank % ep_size)
    routers = [layer.deepspeed_moe.gate.wg.weight for layer in moe_layers(model)]
    before = [r.detach().clone() for r in routers]
    n_local = cfg.moe.num_experts // ep_size
    # The same global expert must start from the same weights whatever the ep_size.
    single = build_model(cfg.model, cfg.moe.__class__(**{**cfg.moe.__dict__, "ep_size": 1}), ep_rank=0)
    first_global = (rank % ep_size) * n_local
    expert_init_matches = all(
        torch.equal(mine.deepspeed_moe.experts.w_in[i], ref.deepspeed_moe.experts.w_in[first_global + i])
        and torch.equal(mine.deepspeed_moe.experts.w_out[i], ref.deepspeed_moe.experts.w_out[first_global + i])
        for mine, ref in zip(moe_layers(model), moe_layers(single))
        for i in range(n_local)
    )
    expert_before = next(moe_layers(model)).deepspeed_moe.experts.w_in.detach().clone()

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_param_groups(model, 0.1), config=cfg.deepspeed
    )
    gathered = [all_gather_cat(r.detach().unsqueeze(0)) for r in routers]
    identical = all(torch.equal(g[i], g[0]) for g in gathered for i in range(world))
    matches_seed = all(
        torch.equal(r.detach(), frozen_router_weight(cfg.model.d_model, cfg.moe.num_experts, cfg.moe.router_seed, i))
        for i, r in enumerate(routers)
    )
    held = optimizer_params(engine)
    in_optimizer = any(id(r) in held for r in routers)
    # The same lookup does find every trainable parameter, so the check above can fail.
    trainable_held = all(id(p) in held for p in engine.module.parameters() if p.requires_grad)

    train_random_steps(engine, 20, seed=rank)
    unchanged = all(torch.equal(r.detach(), b) for r, b in zip(routers, before))
    expert_after = next(moe_layers(engine.module)).deepspeed_moe.experts.w_in
    # Every rank's flags count, not rank 0's only: rank 0 holds experts 0.. (local index = global
    # index), so only another rank shows an expert initialised by its local index, and a router
    # in one rank's optimizer or changed on one rank shows on that rank only.
    everywhere = on_every_rank(
        {
            "router_identical_across_ranks": identical,
            "router_matches_seed": matches_seed,
            "every_trainable_param_in_optimizer": trainable_held,
            "router_grad_is_none": all(r.grad is None for r in routers),
            "router_unchanged_after_20_steps": unchanged,
            "experts_trained": not torch.equal(expert_after.detach(), expert_before),
            "expert_init_independent_of_ep_size": expert_init_matches,
        }
    )
    anywhere = on_any_rank(
        {
            "router_requires_grad": any(r.requires_grad for r in routers),
            "router_in_optimizer": in_optimizer,
        }
    )
    finish(
        out,
        {
            "world": world,
            "ranks_reporting": ranks_reporting(),
            **everywhere,
            **anywhere,
            "local_size": os.environ.get("LOCAL_SIZE"),
            "shm_buffers": [p.name for p in shm_buffers(os.environ["MASTER_PORT"])],
        },
    )


if __name__ == "__main__":
    out, ep, zero = worker_args()
    main(out, int(ep), int(zero))
