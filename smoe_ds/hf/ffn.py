"""A pretrained dense FFN split into N experts behind SMoE-Dropout's frozen random router.

Shape legend: D d_model, F the dense hidden width, N experts, H = F / N.

The experts are ``GroupedExperts`` (stacked [N, H, D] weights, grouped GEMMs) inside the same
``SMoEDropoutFFN`` the built-in LM uses, so routing, dispatch and the DeepSpeed ``MoE`` flavour
are shared; ``smoe_ds.moe.layer.set_active_experts`` picks k for it. What this module adds is
the down projection's bias, which belongs to the whole FFN and is added once: with ``rescale``
at k = N the expert outputs sum to ``act(x W_in^T + b_in) W_out^T`` and the bias completes the
dense FFN; with ``softmax`` the weights sum to 1, so adding it once equals weighting it per
expert. Added per expert under ``rescale`` it would count N / k * k = N times.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe_ds.moe.experts import GroupedExperts
from smoe_ds.moe.layer import SMoEDropoutFFN, deepspeed_moe_class
from smoe_ds.moe.parallel import expert_group_name
from smoe_ds.moe.router import FrozenRandomGate


class ConvertedFFN(nn.Module):
    """x [..., D] -> [..., D]: ``moe`` (router + experts) plus the dense FFN's output bias."""

    def __init__(self, moe: SMoEDropoutFFN, b_out: torch.Tensor | None) -> None:
        super().__init__()
        self.moe = moe
        self.b_out = None if b_out is None else nn.Parameter(b_out)

    @property
    def experts(self) -> GroupedExperts:
        return self.moe.deepspeed_moe.experts

    @property
    def gate(self) -> FrozenRandomGate:
        return self.moe.deepspeed_moe.gate

    @classmethod
    def from_dense(
        cls,
        dense: dict[str, torch.Tensor],
        num_experts: int,
        activation: nn.Module,
        weighting: str,
        router_seed: int,
        layer_index: int,
        ep_size: int = 1,
        ep_rank: int = 0,
        for_deepspeed: bool = False,
    ) -> ConvertedFFN:
        """Split ``dense`` (role -> tensor in the experts' layout, see ``smoe_ds.hf.families``)
        into ``num_experts`` contiguous slices of H = F / N hidden units; the tensors are copied.

        With ``ep_size`` > 1 this rank keeps only its N / ep_size experts, those of expert-parallel
        rank ``ep_rank``; ``for_deepspeed`` makes the FFN a DeepSpeed ``MoE`` that the engine
        shards, reduces and checkpoints per expert. Otherwise (one device, exports) the experts
        are saved as stacked [N, H, D] tensors, like the built-in LM's HF export.
        """
        w_in = dense["w_in"]
        f, d = w_in.shape
        h, local = f // num_experts, num_experts // ep_size
        experts = GroupedExperts(
            local,
            d,
            h,
            expert_group_name(ep_size),
            activation=activation,
            bias="b_in" in dense,
            gated="w_gate" in dense,
        ).to(device=w_in.device, dtype=w_in.dtype)
        if not for_deepspeed:
            experts.use_stacked_state_dict()
        mine = slice(ep_rank * local, (ep_rank + 1) * local)
        with torch.no_grad():
            for role in ("w_in", "w_gate", "w_out"):
                if role in dense:
                    getattr(experts, role).copy_(dense[role].reshape(num_experts, h, d)[mine])
            if "b_in" in dense:
                experts.b_in.copy_(dense["b_in"].reshape(num_experts, h)[mine])
        # The router stays fp32 whatever the model's dtype: FrozenRandomGate routes in fp32.
        gate = FrozenRandomGate(d, num_experts, num_experts, router_seed, layer_index, weighting=weighting)
        ffn_cls = deepspeed_moe_class() if for_deepspeed else SMoEDropoutFFN
        b_out = dense.get("b_out")
        moe = ffn_cls.from_parts(gate.to(w_in.device), experts, ep_size)
        return cls(moe, None if b_out is None else b_out.clone())

    def to_dense(self) -> dict[str, torch.Tensor]:
        """The inverse of ``from_dense``: the expert slices concatenated back, role -> tensor."""
        e = self.experts
        n, h = e.w_in.shape[:2]
        stacked = {"w_in": e.w_in, "b_in": e.b_in, "w_gate": e.w_gate, "w_out": e.w_out}
        dense = {role: t.detach().reshape(n * h, *t.shape[2:]) for role, t in stacked.items() if t is not None}
        if self.b_out is not None:
            dense["b_out"] = self.b_out.detach()
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _, _ = self.moe(x)
        return y if self.b_out is None else y + self.b_out
