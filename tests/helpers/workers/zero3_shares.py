"""Build a ZeRO-3 engine as the trainer does and record what each rank holds of every parameter.

    deepspeed --num_gpus 4 --module tests.helpers.workers.zero3_shares OUT_JSON EP_SIZE

Rank 0 writes OUT_JSON: {rank: {name: {"numel", "local_numel", "group_ranks", "expert"}}}, read
from the engine's partitioned tensors (``ds_tensor``, ``ds_process_group``).
"""

from __future__ import annotations

import json

import torch.distributed as dist

from smoe_ds.distributed import process_group as D
from smoe_ds.distributed.zero3 import expert_params, partition_share
from smoe_ds.models.lm import build_model
from smoe_ds.training.runtime import initialize_engine
from tests.helpers.workers.common import start, tiny_config, worker_args


def main(out_json: str, ep_size: int) -> None:
    rank, world = start()
    cfg = tiny_config(ep_size=ep_size, zero_stage=3)
    model = build_model(cfg.model, cfg.moe, ep_rank=rank % ep_size, for_deepspeed=False)
    engine = initialize_engine(model, cfg)
    experts = {id(p) for p in expert_params(engine.module)}
    mine = {
        name: {**partition_share(p), "expert": id(p) in experts, "trainable": p.requires_grad}
        for name, p in engine.module.named_parameters()
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(dict(enumerate(everyone)), f)
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    out, ep = worker_args()
    main(out, int(ep))
