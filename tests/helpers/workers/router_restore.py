"""Restore a checkpoint into an engine built with another router std, and save its routers.

    python -m tests.helpers.workers.router_restore CHECKPOINT_DIR OUT.pt ROUTER_INIT_STD

The engine is built as the trainer builds it (so its routers start from ROUTER_INIT_STD) and
then restored by ``smoe_ds.checkpoint.restore``, as a resumed run is; OUT.pt holds the routers
[N, D] of every MoE layer afterwards.
"""

from __future__ import annotations

import deepspeed
import torch

from smoe_ds import checkpoint
from smoe_ds.distributed import process_group as D
from smoe_ds.models.lm import build_model
from smoe_ds.moe.layer import moe_layers
from smoe_ds.training.runtime import optimizer_param_groups
from tests.helpers.workers.common import start, tiny_config, worker_args


def main(ckpt_dir: str, out: str, std: float) -> None:
    rank, _ = start()
    cfg = tiny_config(router_init_std=std)
    model = build_model(cfg.model, cfg.moe)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_param_groups(model, 0.1), config=cfg.deepspeed
    )
    step, _ = checkpoint.restore(engine, cfg, ckpt_dir)
    assert step == 5, step
    if rank == 0:
        torch.save([layer.deepspeed_moe.gate.wg.weight.detach().clone() for layer in moe_layers(engine.module)], out)
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    ckpt, out, std = worker_args()
    main(ckpt, out, float(std))
