"""Expert replicas stay in step: 4 ranks, ep_size 2, ZeRO-2, every rank on different data.

    deepspeed --num_gpus 4 --module tests.helpers.workers.expert_replicas OUT.json

Ranks r and r + 2 hold the same experts (one expert-data-parallel group); only an all-reduce
of the expert gradients over that group keeps their copies equal after each step. Writes,
per rank, how far its experts and its non-expert weights are from rank 0's or its replica's,
and how far the experts moved from their initial values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smoe_ds.models.lm import build_model
from smoe_ds.training.runtime import optimizer_param_groups
from tests.helpers.workers.common import finish, start, tiny_config, train_random_steps, worker_args


def flat(engine, experts: bool) -> torch.Tensor:
    """This rank's expert (or non-expert) parameters, concatenated into one vector."""
    params = engine.module.named_parameters()
    return torch.cat([p.detach().flatten() for n, p in params if (".experts." in n) == experts])


def max_diffs(t: torch.Tensor, partner) -> list[float]:
    """For each rank r: max |t on r - t on partner(r)|."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return [float((parts[r] - parts[partner(r)]).abs().max()) for r in range(len(parts))]


def main(out_path: str) -> None:
    import deepspeed

    rank, world = start()
    assert world == 4
    cfg = tiny_config(ep_size=2, zero_stage=2)
    model = build_model(cfg.model, cfg.moe, ep_rank=rank % 2)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_param_groups(model, 0.1), config=cfg.deepspeed
    )
    before = flat(engine, experts=True).clone()
    train_random_steps(engine, 3, seed=100 + rank)  # a different batch on every rank
    experts = flat(engine, experts=True)
    finish(
        out_path,
        {
            "expert_replica_diff": max_diffs(experts, lambda r: (r + 2) % 4),
            "expert_other_rank_diff": max_diffs(experts, lambda r: (r + 1) % 4),
            "dense_diff": max_diffs(flat(engine, experts=False), lambda r: 0),
            "expert_moved": float((experts - before).abs().max()),
        },
    )


if __name__ == "__main__":
    (out,) = worker_args()
    main(out)
