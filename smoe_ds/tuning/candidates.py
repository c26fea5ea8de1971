"""The settings smoe-tune searches, and the config overrides each candidate is.

A candidate fixes the knobs that decide an SMoE-Dropout job's speed and memory without changing
what it learns: the micro-batch size and gradient accumulation (their product, and so the global
batch, held fixed), ``moe.ep_size`` (a divisor of both the world size and N), ``moe.ep_exchange``
(meaningful at ep_size > 1 only), the ZeRO stage (0 to 3) and optimizer offload (stages 2 and 3,
with DeepSpeed's CPU Adam, which offload is built for). Activation checkpointing is not among
them: the built-in model has none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

from smoe_ds.config.schema import EP_EXCHANGES, TrainConfig, config_from_dict

OFFLOAD_STAGES = (2, 3)


@dataclass(frozen=True, order=True)
class Candidate:
    micro_batch: int  # sequences per rank per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    ep_size: int
    ep_exchange: str  # "tokens" or "weights"; the config's own at ep_size 1, where nothing is exchanged
    zero_stage: int
    offload: bool  # offload_optimizer to the CPU

    @property
    def key(self) -> str:
        """A name that is also a folder name, e.g. ``mb4x2-ep2-weights-z2-offload``."""
        exchange = f"-{self.ep_exchange}" if self.ep_size > 1 else ""
        offload = "-offload" if self.offload else ""
        return f"mb{self.micro_batch}x{self.grad_accum}-ep{self.ep_size}{exchange}-z{self.zero_stage}{offload}"

    def describe(self) -> str:
        """For people: ``micro-batch 4 x 2, ep_size 2 (weights), ZeRO-2 + offload``."""
        exchange = f" ({self.ep_exchange})" if self.ep_size > 1 else ""
        offload = " + offload" if self.offload else ""
        batch = f"micro-batch {self.micro_batch} x {self.grad_accum}"
        return f"{batch}, ep_size {self.ep_size}{exchange}, ZeRO-{self.zero_stage}{offload}"

    def as_dict(self) -> dict:
        return asdict(self)

    def differs_from(self, other: "Candidate") -> int:
        """How many knobs (``KNOBS``) differ."""
        return sum(value(self) != value(other) for value in KNOBS.values())


# The knobs, in the order smoe-tune searches them, and what a candidate's value of each is
# (micro-batch and accumulation are one knob: their product is fixed).
KNOBS: dict[str, Callable[[Candidate], tuple]] = {
    "micro_batch": lambda c: (c.micro_batch, c.grad_accum),
    "expert_parallel": lambda c: (c.ep_size, c.ep_exchange if c.ep_size > 1 else None),
    "zero_stage": lambda c: (c.zero_stage,),
    "offload": lambda c: (c.offload,),
}


def offloads(cfg: TrainConfig) -> bool:
    """Whether the config offloads the optimizer (``zero_optimization.offload_optimizer``)."""
    zero = cfg.deepspeed.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def of_config(cfg: TrainConfig, world_size: int) -> Candidate:
    """The candidate a config already is."""
    return Candidate(
        micro_batch=cfg.micro_batch_size(world_size),
        grad_accum=cfg.grad_accum_steps(world_size),
        ep_size=cfg.expert_parallel_size,
        ep_exchange=cfg.moe.ep_exchange,
        zero_stage=cfg.zero_stage,
        offload=offloads(cfg),
    )


def enumerate_candidates(cfg: TrainConfig, world_size: int) -> list[Candidate]:
    """Every candidate for ``cfg`` on ``world_size`` ranks, in a stable order."""
    base = of_config(cfg, world_size)
    per_rank = base.micro_batch * base.grad_accum
    batches = [(m, per_rank // m) for m in range(1, per_rank + 1) if per_rank % m == 0]
    n = cfg.moe.num_experts
    ep_sizes = [p for p in range(1, world_size + 1) if world_size % p == 0 and n % p == 0] if cfg.uses_moe else [1]
    found = []
    for micro, accum in batches:
        for ep in ep_sizes:
            for exchange in EP_EXCHANGES if ep > 1 else (base.ep_exchange,):
                for stage in range(4):
                    for offload in (False, True) if stage in OFFLOAD_STAGES else (False,):
                        found.append(Candidate(micro, accum, ep, exchange, stage, offload))
    return sorted(found)


def zero_section(cfg: TrainConfig, c: Candidate) -> dict:
    """The config's zero_optimization with the candidate's stage and offload: keys that belong to
    one stage only are dropped when the stage changes, and ZeRO-2 with MoE gets the two switches
    it needs (``TrainConfig.validate``)."""
    zero = dict(cfg.deepspeed.get("zero_optimization", {}))
    if zero.get("stage", 0) != c.zero_stage:
        zero = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k not in ("reduce_scatter",)}
    zero["stage"] = c.zero_stage
    if c.zero_stage == 2:
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    zero.pop("offload_optimizer", None)
    if c.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return zero


def apply(raw: dict, cfg: TrainConfig, c: Candidate, accelerator_is_host: bool) -> dict:
    """A copy of the JSON config ``raw`` (whose loaded form is ``cfg``) set to candidate ``c``."""
    out = copy.deepcopy(raw)
    out["train_micro_batch_size_per_gpu"] = c.micro_batch
    out["gradient_accumulation_steps"] = c.grad_accum
    out.pop("train_batch_size", None)  # implied by the two above; a stale one would contradict them
    out["zero_optimization"] = zero_section(cfg, c)
    params = out.setdefault("optimizer", {}).setdefault("params", {})
    if c.offload:
        params["torch_adam"] = False  # offload is built for DeepSpeed's CPU Adam
    elif offloads(cfg):
        # From an offloaded config: torch's Adam on the CPU accelerator (DeepSpeed's fused one is
        # GPU-only), DeepSpeed's choice (FusedAdam) on a GPU.
        params["torch_adam"] = accelerator_is_host
    if cfg.uses_moe:
        out.setdefault("moe", {}).update(ep_size=c.ep_size, ep_exchange=c.ep_exchange)
    return out


def load_candidate(raw: dict, world_size: int) -> TrainConfig:
    """``raw`` loaded and checked as smoe-train would on ``world_size`` ranks; raises ConfigError
    (one line) for a candidate the config cannot take."""
    cfg = config_from_dict(copy.deepcopy(raw)).resolve()
    cfg.validate_for_world(world_size)
    return cfg
