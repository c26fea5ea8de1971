"""The built-in language model: pre-LayerNorm GPT with (S)MoE FFNs, or (``model.objective``
"masked_lm") the same blocks as a bidirectional encoder trained on BERT's masked tokens.

Shapes (the legend of ``smoe_ds.moe``): B batch, L sequence length, D d_model, A attention heads,
Dh = D / A head size, V vocab.

Weights are initialised by ``init_weights`` as a pure function of (init_seed, the
parameter's global name), so a model built with any world size or ep_size starts from the
same numbers: expert e of layer L gets the same weights whichever rank holds it.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from smoe_ds.config.schema import ModelConfig, MoEConfig
from smoe_ds.moe.experts import GroupedExperts, global_expert_name, per_expert_key
from smoe_ds.moe.layer import build_ffn, ffn_forward, moe_layers

IGNORE = -100  # a target that is not scored: the encoder's unmasked positions


class LMOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, V]; with the encoder's targets, the M scored positions' only: [M, V]
    loss: torch.Tensor | None  # what backward runs on: lm_loss + aux_loss_coef * aux_loss
    lm_loss: torch.Tensor | None  # mean cross-entropy over the scored targets (next tokens, or masked ones), nats
    aux_loss: torch.Tensor  # sum of the MoE balance losses (0 for SMoE-Dropout and dense)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [L, Dh/2] for rotary position embeddings (base 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, A, L, Dh] by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Causal for the decoder; bidirectional for the encoder, where padding is masked out of the keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = cfg.positions == "rope"
        self.causal = cfg.objective == "causal_lm"

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, keys_B11L: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; ``keys_B11L`` (bool, True = a real token) masks the encoder's padding.
        The causal mask alone serves the decoder: its inputs are right-padded, so no real token sees a pad."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, A, L, Dh)
        if self.rotary:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if self.causal else keys_B11L,
            is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """x + attn(LN(x)), then x + ffn(LN(x)); the FFN may be an MoE layer."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope, keys_B11L: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop(self.attn(self.ln1(x), rope, keys_B11L))
        y, aux = ffn_forward(self.ffn, self.ln2(x))
        return x + self.drop(y), aux


class SMoELM(nn.Module):
    """Token ids [B, L] -> logits [B, L, V]; MoE FFNs in the blocks listed by ``model.moe_layers``.

    ``targets`` [B, L] are the next tokens (decoder) or the masked tokens' ids with -100 at every
    other position (encoder, ``smoe_ds.masking``): the loss is the mean cross-entropy over the
    positions that are not -100, which for the decoder is every position.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, for_deepspeed: bool = True) -> None:
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        dense_moe = MoEConfig(**{**moe_cfg.__dict__, "mode": "dense"})
        moe_at = set(cfg.moe_layer_indices())
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                build_ffn(
                    cfg.d_model, moe_cfg if i in moe_at else dense_moe, layer_index=i, for_deepspeed=for_deepspeed
                ),
            )
            for i in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one V x D matrix

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        x, aux_total = self.hidden_states(idx)
        if targets is not None and self.cfg.objective == "masked_lm":
            # Only the masked positions are scored: their logits alone [M, V], about 0.15 of the
            # output layer's work, which with a WordPiece vocabulary is most of a small encoder's.
            scored = targets != IGNORE
            x, targets = x[scored], targets[scored]
        logits = self.lm_head(x)  # (B, L, V), or the encoder's (M, V)
        if targets is None:
            return LMOutput(logits, None, None, aux_total)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
        return LMOutput(logits, self.training_loss(lm_loss, aux_total), lm_loss, aux_total)

    def training_loss(self, task_loss: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """What backward runs on: the task's loss, plus the weighted balance loss for the learned router."""
        return task_loss + self.moe_cfg.aux_loss_coef * aux if self.moe_cfg.mode == "learned" else task_loss

    def hidden_states(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (the final LayerNorm's output [B, L, D], the summed balance loss).
        ``attention_mask`` [B, L] (1 = a real token) keeps the encoder's padding out of every key."""
        B, L = idx.shape
        if L > self.cfg.block_size:
            raise ValueError(f"sequence length {L} exceeds model.block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, L, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(L, device=idx.device))
        # Rotary tables are cheap ([L, Dh/2]) and rebuilt per call, so no buffer has to follow the
        # module across devices or survive meta-device construction.
        rope = rotary_tables(L, self.cfg.d_model // self.cfg.n_heads, idx.device) if self.pos_emb is None else None
        x = self.drop(x)
        aux_total = x.new_zeros((), dtype=torch.float32)
        keys_B11L = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x, aux = block(x, rope, keys_B11L)
            aux_total = aux_total + aux
        return self.ln_f(x), aux_total

    @property
    def num_experts(self) -> int:
        return self.moe_cfg.num_experts


def _draw(seed: int, global_name: str, shape: tuple, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_name}".encode()))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(model: SMoELM, seed: int, ep_rank: int = 0) -> None:
    """Initialise every trainable parameter from a generator keyed by (seed, global name).

    GPT-2 style: N(0, 0.02) for matrices and embeddings, with the residual output projections
    scaled by 1/sqrt(2 * n_layers); LayerNorms at (1, 0). The frozen routers keep their own
    seeded values. Stacked experts are drawn one expert at a time under the per-expert name
    their checkpoint uses (``...deepspeed_experts.{global id}.w_in.weight``).
    """
    residual_std = 0.02 / math.sqrt(2 * model.cfg.n_layers)
    stacked = set()
    for mname, m in model.named_modules():
        if isinstance(m, GroupedExperts):
            E = m.num_local_experts
            for e in range(E):
                key = functools.partial(per_expert_key, f"{mname}.", ep_rank * E + e)
                m.w_in[e].copy_(_draw(seed, key("w_in"), (m.d_hidden, m.d_model), 0.02))
                m.w_out[e].copy_(_draw(seed, key("w_out"), (m.d_model, m.d_hidden), residual_std).t())
            stacked |= {id(m.w_in), id(m.w_out)}
    n_local = model.moe_cfg.num_experts // model.moe_cfg.ep_size
    for name, p in model.named_parameters():
        if getattr(p, "smoe_frozen_router", False) or id(p) in stacked:
            continue
        if ".ln" in name or name.startswith("ln_f"):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        std = residual_std if name.endswith(("proj.weight", "w_out.weight")) else 0.02
        p.copy_(_draw(seed, global_expert_name(name, ep_rank, n_local), tuple(p.shape), std))


def build_model(cfg: ModelConfig, moe_cfg: MoEConfig, ep_rank: int = 0, for_deepspeed: bool = True) -> SMoELM:
    """Build the LM and initialise it; ``ep_rank`` is this rank's place in its expert-parallel group.

    ``for_deepspeed=False`` builds the MoE layers as plain modules, not DeepSpeed ``MoE`` instances:
    without importing DeepSpeed for single-device inference, and for ZeRO-3 (``smoe_ds.distributed.zero3``).
    """
    model = SMoELM(cfg, moe_cfg, for_deepspeed)
    init_weights(model, cfg.init_seed, ep_rank)
    return model


def count_parameters(model: nn.Module, ep_size: int = 1) -> int:
    """Global parameter count: local expert parameters count ep_size times (one copy per EP rank)."""
    expert_ids = {id(p) for layer in moe_layers(model) for p in layer.deepspeed_moe.experts.parameters()}
    # ds_numel: a ZeRO-3-partitioned parameter's full size (its numel() is then 0)
    return sum(getattr(p, "ds_numel", p.numel()) * (ep_size if id(p) in expert_ids else 1) for p in model.parameters())
