"""Activation memory of one micro-batch, measured: the bytes autograd holds from forward to backward.

One forward of the config's model (all N experts in this process, at the schedule's largest k, in
the training precision) runs under ``torch.autograd.graph.saved_tensors_hooks``, which sees every
tensor a backward will need. Their storages are counted once each, and the parameters' own
storages not at all (they are model state, counted by ``smoe_ds.tuning.memory_model``). This is
the peak a backward starts from; the transient buffers of single ops are not in it.
"""

from __future__ import annotations

import torch

from smoe_ds.config.schema import TrainConfig


def training_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.precision_enabled("bf16"):
        return torch.bfloat16
    return torch.float16 if cfg.precision_enabled("fp16") else torch.float32


def saved_activation_bytes(cfg: TrainConfig, micro_batch: int, device: str = "cpu") -> int:
    """Bytes one micro-batch of ``micro_batch`` sequences [micro_batch, block_size] keeps for
    backward in ``cfg``'s model. ``cfg.model.vocab_size`` must be set (``memory_model.vocab_size``)."""
    from smoe_ds.models.lm import SMoELM
    from smoe_ds.moe.layer import set_active_experts

    model_cfg = cfg.model
    moe = type(cfg.moe)(**{**cfg.moe.__dict__, "ep_size": 1})  # every expert here: tokens stay on this rank
    # Weights are random: what is measured is shapes, not values, so no initialisation runs.
    model = SMoELM(model_cfg, moe, for_deepspeed=False).to(device=device, dtype=training_dtype(cfg)).train()
    if cfg.uses_moe:
        set_active_experts(model, cfg.moe.k_schedule.k_max if cfg.moe.mode == "smoe_dropout" else cfg.fixed_k())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model_cfg.vocab_size, (micro_batch, model_cfg.block_size), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, ids)
    del out
    return sum(saved.values())
