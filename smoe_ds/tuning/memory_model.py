"""Bytes per rank of a smoe-train job, predicted before anything runs.

Two parts, as ``docs/memory.md`` lays them out:
- **model state**, by formula: with P parameters outside the experts (T of them trainable; the
  frozen routers are not), Q expert parameters on one expert-parallel rank, W ranks and
  G = W / ep_size ranks that hold the same experts, each rank keeps

  | stage | weights | gradients | fp32 masters | Adam moments |
  |---|---|---|---|---|
  | 0 | e (P + Q) | e (T + Q) | 4 (T + Q) if e < 4, else 0 | 8 (T + Q) |
  | 1 | e (P + Q) | e (T + Q) | 4 (T / W + Q / G) | 8 (T / W + Q / G) |
  | 2 | e (P + Q) | e (T / W + Q / G) | 4 (T / W + Q / G) | 8 (T / W + Q / G) |
  | 3 | e (P / W + Q / G) | e (T / W + Q / G) | 4 (T / W + Q / G) | 8 (T / W + Q / G) |

  with e = 4 bytes in fp32 training, 2 in bf16/fp16. ``offload_optimizer`` moves the masters and
  moments to host memory. ZeRO-3 also holds whole the tensors below
  ``stage3_param_persistence_threshold`` once used, and gathers one block's others at a time.
  ZeRO-1/2 with contiguous gradients also allocate a gradient bucket of
  ``reduce_bucket_size`` elements (two with ``overlap_comm``; DeepSpeed 0.19.8,
  ``runtime/zero/stage_1_and_2.py``, ``setup_buckets``).
- **activations**, measured once per micro-batch size (``smoe_ds.tuning.activations``), plus what
  expert parallelism adds to them: the gathered experts of the other ranks (``moe.ep_exchange``
  "weights", held for backward) or the dispatched and combined token rows ("tokens").

What is not modelled: the process itself (Python, torch and DeepSpeed, about 0.7 GiB per rank on
the CPU; the CUDA context on a GPU), allocator fragmentation, and ZeRO-3's prefetch buffers.
A memory budget is for the job's tensors, so leave those out of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from smoe_ds.config.schema import TrainConfig
from smoe_ds.tuning.candidates import offloads

# DeepSpeed 0.19.8's default zero_optimization.reduce_bucket_size (runtime/zero/config.py), in elements.
DEFAULT_REDUCE_BUCKET_SIZE = 500_000_000
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # zero_optimization.stage3_param_persistence_threshold's default
FP32_BYTES, MASTER_BYTES, MOMENT_BYTES = 4, 4, 8  # fp32 element; Adam's exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one expert-parallel rank's model (see the module docstring's P, T, Q)."""

    outside_experts: int  # P: everything outside the experts, frozen routers included
    trainable_outside_experts: int  # T: P less the frozen routers
    experts_per_rank: int  # Q: this rank's N / ep_size experts of every MoE layer
    experts_all: int  # Q at ep_size 1: every expert of every MoE layer
    tensor_sizes: tuple[int, ...]  # elements of every parameter tensor (this rank's experts)
    block_tensor_sizes: tuple[tuple[int, ...], ...]  # the same, per transformer block

    def zero3_resident(self, persistence_threshold: int) -> int:
        """Elements ZeRO-3 holds whole besides its partitions: the tensors below
        ``stage3_param_persistence_threshold`` (kept once gathered) and the largest block's other
        tensors, gathered for its forward and backward."""
        persistent = sum(n for n in self.tensor_sizes if n < persistence_threshold)
        gathered = [sum(n for n in block if n >= persistence_threshold) for block in self.block_tensor_sizes]
        return persistent + max(gathered, default=0)


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted bytes on one rank, by kind; ``device`` is what the accelerator holds."""

    weights: int  # this rank's storage of the weights (ZeRO-3: its partitions only)
    zero3_resident: int  # ZeRO-3: the whole tensors it keeps or gathers besides its partitions
    gradients: int
    master_weights: int
    optimizer_moments: int
    gradient_buckets: int
    activations: int
    exchange: int  # what expert parallelism adds to the activations
    offloaded: bool  # masters and moments on the host (offload_optimizer)
    accelerator_is_host: bool  # a CPU run: the "device" and the host are one memory

    @property
    def model_state(self) -> int:
        """What ``smoe_ds.distributed.memory`` measures from the engine: weights, masters, moments."""
        return self.weights + self.master_weights + self.optimizer_moments

    @property
    def device(self) -> int:
        """Bytes the budget applies to: everything, less the offloaded state when the accelerator
        has memory of its own."""
        total = (
            self.model_state
            + self.zero3_resident
            + self.gradients
            + self.gradient_buckets
            + self.activations
            + self.exchange
        )
        if self.offloaded and not self.accelerator_is_host:
            total -= self.master_weights + self.optimizer_moments
        return total

    def as_dict(self) -> dict:
        return {**asdict(self), "model_state": self.model_state, "device": self.device}


def element_bytes(cfg: TrainConfig) -> int:
    """Bytes of one weight, gradient or activation element: 2 in bf16/fp16 training, else 4."""
    return 2 if cfg.precision_enabled("bf16") or cfg.precision_enabled("fp16") else FP32_BYTES


def vocab_size(cfg: TrainConfig) -> int:
    """The vocabulary the trainer will build the model with: the tokenizer's, or 256 bytes."""
    from smoe_ds.data import make_tokenizer

    return make_tokenizer(cfg.data).vocab_size


def count_parameters(cfg: TrainConfig) -> ParameterCounts:
    """P, T and Q of ``cfg``'s model at its ep_size, from the model built on the meta device
    (shapes only: nothing is allocated or initialised). ``cfg.model.vocab_size`` must be set."""
    from smoe_ds.models.lm import SMoELM
    from smoe_ds.moe.layer import moe_layers

    with torch.device("meta"):
        model = SMoELM(cfg.model, cfg.moe, for_deepspeed=False)
    experts = {id(p) for layer in moe_layers(model) for p in layer.deepspeed_moe.experts.parameters()}
    unique = {id(p): p for p in model.parameters()}.values()  # the tied embedding counts once
    outside = [p for p in unique if id(p) not in experts]
    q = sum(p.numel() for p in unique if id(p) in experts)
    blocks = tuple(tuple(p.numel() for p in b.parameters()) for b in getattr(model, "blocks", []))
    return ParameterCounts(
        outside_experts=sum(p.numel() for p in outside),
        trainable_outside_experts=sum(p.numel() for p in outside if p.requires_grad),
        experts_per_rank=q,
        experts_all=q * cfg.expert_parallel_size,
        tensor_sizes=tuple(p.numel() for p in unique),
        block_tensor_sizes=blocks,
    )


def exchange_bytes(cfg: TrainConfig, counts: ParameterCounts, tokens_per_rank: int) -> int:
    """What expert parallelism adds to one rank's activations, held from forward to backward:
    the other ranks' experts gathered ("weights"), or per MoE layer the dispatched rows and the
    returned results at the schedule's largest k ("tokens"; at most every route of every token)."""
    ep = cfg.expert_parallel_size
    if ep == 1:
        return 0
    e = element_bytes(cfg)
    if cfg.moe.ep_exchange == "weights":
        return e * (counts.experts_all - counts.experts_per_rank)
    k = cfg.moe.k_schedule.k_max if cfg.moe.mode == "smoe_dropout" else cfg.fixed_k()
    layers = len(cfg.model.moe_layer_indices())
    return e * layers * 2 * tokens_per_rank * k * cfg.model.d_model


def predict(
    cfg: TrainConfig, world_size: int, counts: ParameterCounts, activations: int, accelerator_is_host: bool
) -> MemoryPrediction:
    """Bytes per rank of ``cfg`` on ``world_size`` ranks (the largest rank: shares round up).
    ``counts`` must be taken at ``cfg``'s ep_size; ``activations``: the measured bytes one
    micro-batch holds for backward (``smoe_ds.tuning.activations``)."""
    e = element_bytes(cfg)
    stage = cfg.zero_stage
    zero = cfg.deepspeed.get("zero_optimization", {})
    P, T, Q = counts.outside_experts, counts.trainable_outside_experts, counts.experts_per_rank
    W, G = world_size, world_size // cfg.expert_parallel_size
    trainable_share = math.ceil(T / W) + math.ceil(Q / G)  # this rank's partition of what trains
    weights = e * (P + Q) if stage < 3 else e * (math.ceil(P / W) + math.ceil(Q / G))
    threshold = int(zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD))
    resident = e * counts.zero3_resident(threshold) if stage == 3 else 0
    gradients = e * (T + Q) if stage < 2 else e * trainable_share
    optimized = T + Q if stage == 0 else trainable_share
    masters = MASTER_BYTES * optimized if (stage > 0 or e < FP32_BYTES) else 0
    buckets = 0
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        bucket = int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET_SIZE))
        # On the CPU the bucket's pages are only ever touched as far as gradients fill it.
        elements = min(bucket, T + Q) if accelerator_is_host else bucket
        buckets = FP32_BYTES * elements * (2 if zero.get("overlap_comm", False) else 1)
    tokens = cfg.micro_batch_size(world_size) * cfg.model.block_size
    return MemoryPrediction(
        weights=weights,
        zero3_resident=resident,
        gradients=gradients,
        master_weights=masters,
        optimizer_moments=MOMENT_BYTES * optimized,
        gradient_buckets=buckets,
        activations=activations,
        exchange=exchange_bytes(cfg, counts, tokens),
        offloaded=offloads(cfg),
        accelerator_is_host=accelerator_is_host,
    )
