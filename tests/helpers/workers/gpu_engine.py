"""One device, a real DeepSpeed engine (ep_size 1, ZeRO-2, bf16): train, checkpoint, record logits.

    deepspeed --num_gpus 1 --module tests.helpers.workers.gpu_engine OUT_DIR

Trains 20 steps on one fixed batch (so the loss must fall), saves OUT_DIR/checkpoints as the
trainer does, and writes OUT_DIR/engine.pt: {"losses": [20 floats], "probe": [2, 16] token ids,
"logits": {k: [2, 16, V] fp32 on the CPU}} for k = 1, N/2, N from the engine's own forward.
"""

from __future__ import annotations

import torch

from smoe_ds import checkpoint
from smoe_ds.distributed import process_group as D
from smoe_ds.models.lm import build_model
from smoe_ds.training.runtime import optimizer_param_groups
from tests.helpers.workers.common import engine_logits_at_ks, start, tiny_config, worker_args

STEPS = 20


def main(out_dir: str) -> None:
    import deepspeed

    start()
    cfg = tiny_config(ep_size=1, zero_stage=2)
    cfg.deepspeed["zero_optimization"] = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}
    cfg.deepspeed["bf16"] = {"enabled": True}
    model = build_model(cfg.model, cfg.moe, ep_rank=0)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_param_groups(model, 0.1), config=cfg.deepspeed
    )
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(engine.device)
    losses = []
    for _ in range(STEPS):
        result = engine(x, torch.roll(x, -1, dims=1))
        engine.backward(result.loss)
        engine.step()
        losses.append(float(result.loss))
    checkpoint.save(engine, cfg, f"{out_dir}/checkpoints", STEPS)
    probe, logits = engine_logits_at_ks(engine, cfg.moe.num_experts)
    torch.save(
        {"losses": losses, "probe": probe, "logits": logits, "device": str(engine.device)}, f"{out_dir}/engine.pt"
    )
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    (out,) = worker_args()
    main(out)
