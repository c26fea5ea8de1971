"""The FFN of one transformer block in each ``moe.mode``.

- ``smoe_dropout``: ``SMoEDropoutMoE``, DeepSpeed's ``MoE`` with the frozen random router.
- ``learned``: DeepSpeed's stock ``MoE`` (trainable ``TopKGate`` with its balance loss), fixed k.
- ``dense``: one ``FeedForward`` of width N * d_expert, the same parameter count.

Both MoE variants are ``deepspeed.moe.layer.MoE`` instances, which is what makes the
DeepSpeed engine reduce expert gradients over the expert-data-parallel group only, save one
file per global expert and build MoE parameter groups for ZeRO-1/2.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from smoe_ds.config import MoEConfig
from smoe_ds.moe.experts import FeedForward
from smoe_ds.moe.router import FrozenRandomGate


class SMoEDropoutMoE(MoE):
    """DeepSpeed MoE layer routed by a frozen random router; x [B, T, D] -> ([B, T, D], l_aux, counts)."""

    def __init__(self, d_model: int, cfg: MoEConfig, layer_index: int) -> None:
        super().__init__(
            hidden_size=d_model,
            expert=FeedForward(d_model, cfg.d_expert),
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=1,
            drop_tokens=False,
        )
        # Replace the stock trainable gate; MOELayer keeps calling it through the same interface.
        self.deepspeed_moe.gate = FrozenRandomGate(
            d_model,
            cfg.num_experts,
            k=cfg.k_schedule.k_max,
            router_seed=cfg.router_seed,
            layer_index=layer_index,
            capacity_factor=cfg.capacity_factor,
        )


def build_ffn(d_model: int, cfg: MoEConfig, layer_index: int) -> nn.Module:
    """The FFN for block ``layer_index`` of a model whose MoE blocks use ``cfg``."""
    if cfg.mode == "smoe_dropout":
        return SMoEDropoutMoE(d_model, cfg, layer_index)
    if cfg.mode == "learned":
        return MoE(
            hidden_size=d_model,
            expert=FeedForward(d_model, cfg.d_expert),
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=cfg.k,
            capacity_factor=cfg.capacity_factor or 1.0,
            eval_capacity_factor=cfg.capacity_factor or 1.0,
            drop_tokens=cfg.capacity_factor is not None,
            top2_2nd_expert_sampling=False,  # plain top-k, so evaluation at any k is deterministic
        )
    return FeedForward(d_model, cfg.num_experts * cfg.d_expert)


def ffn_forward(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run any FFN from ``build_ffn``: x [B, T, D] -> (y [B, T, D], balance loss scalar)."""
    if isinstance(ffn, MoE):
        y, l_aux, _ = ffn(x)
        return y, l_aux.float()
    return ffn(x), x.new_zeros((), dtype=torch.float32)


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    return (m for m in model.modules() if isinstance(m, MoE))


def set_active_experts(model: nn.Module, k: int) -> None:
    """Route every MoE layer of ``model`` to its top ``k`` experts from the next forward on.

    Works for the learned baseline too (DeepSpeed's TopKGate reads ``k`` on each forward).
    A dense model has no experts to choose, so there it does nothing.
    """
    for layer in moe_layers(model):
        n = layer.num_experts
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        layer.deepspeed_moe.gate.k = k
