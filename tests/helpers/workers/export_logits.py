"""Train a few steps on a real engine, save a checkpoint, and record the distributed logits.

    torchrun --nproc_per_node P -m tests.helpers.workers.export_logits OUT_DIR EP_SIZE ZERO_STAGE

Writes OUT_DIR/checkpoints (as the trainer does) and, from rank 0, OUT_DIR/logits.pt:
{k: logits [2, 16, V]} for k = 1, N/2, N on a fixed input that every rank feeds.
"""

from __future__ import annotations

import torch

from smoe_ds import checkpoint
from smoe_ds.distributed import process_group as D
from smoe_ds.models.lm import build_model
from smoe_ds.training.runtime import initialize_engine
from tests.helpers.workers.common import engine_logits_at_ks, start, tiny_config, train_random_steps, worker_args


def main(out_dir: str, ep_size: int, zero_stage: int) -> None:
    rank, world = start()
    zero = {"stage": zero_stage, **({"contiguous_gradients": True, "reduce_scatter": True} if zero_stage == 2 else {})}
    cfg = tiny_config(ep_size=ep_size, zero_stage=zero_stage)
    cfg.deepspeed["zero_optimization"] = zero
    model = build_model(cfg.model, cfg.moe, ep_rank=rank % ep_size, for_deepspeed=zero_stage != 3)
    engine = initialize_engine(model, cfg)  # as the trainer does; ZeRO-3 needs its preparation
    train_random_steps(engine, 5, seed=rank)
    checkpoint.save(engine, cfg, f"{out_dir}/checkpoints", 5)
    probe, logits = engine_logits_at_ks(engine, cfg.moe.num_experts)
    if rank == 0:
        torch.save({"probe": probe, "logits": logits}, f"{out_dir}/logits.pt")
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    out, ep, zero = worker_args()
    main(out, int(ep), int(zero))
