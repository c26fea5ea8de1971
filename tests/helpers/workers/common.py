"""Shared set-up for the multi-rank test workers (run with -m under a launcher)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from smoe_ds.config.schema import TrainConfig, config_from_dict
from smoe_ds.distributed import process_group as D


def tiny_config(*, ep_size: int = 1, zero_stage: int = 0, num_experts: int = 4, **moe) -> TrainConfig:
    raw = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "block_size": 16},
        "moe": {"num_experts": num_experts, "d_expert": 8, "ep_size": ep_size, **moe},
        "run": {"max_steps": 20},
    }
    return config_from_dict(raw).resolve()


def worker_args() -> list[str]:
    """argv without the --local_rank=N that the deepspeed launcher adds."""
    return [a for a in sys.argv[1:] if not a.startswith("--local_rank")]


def start() -> tuple[int, int]:
    torch.set_num_threads(1)
    D.init_distributed(timeout_s=300)
    return D.rank(), D.world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [n_r, ...] from every rank along dim 0; n_r may differ between ranks."""
    if D.world_size() == 1:
        return t.clone()
    n = torch.tensor([t.shape[0]])
    sizes = [torch.zeros_like(n) for _ in range(D.world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def on_every_rank(flags: dict[str, bool]) -> dict[str, bool]:
    """Each flag true only if it is true on every rank (an all-reduce MIN), so that rank 0's report
    (``finish``) shows a flag that failed on any rank; every rank must call it, with the same keys."""
    return _reduced(flags, dist.ReduceOp.MIN)


def on_any_rank(flags: dict[str, bool]) -> dict[str, bool]:
    """Each flag true if it is true on at least one rank (an all-reduce MAX); see ``on_every_rank``."""
    return _reduced(flags, dist.ReduceOp.MAX)


def _reduced(flags: dict[str, bool], op) -> dict[str, bool]:
    values = torch.tensor([int(bool(flags[key])) for key in sorted(flags)], dtype=torch.int64)
    if D.world_size() > 1:
        dist.all_reduce(values, op=op)
    return {key: bool(v) for key, v in zip(sorted(flags), values.tolist())}


def ranks_reporting() -> int:
    """How many ranks take part in the reductions above (an all-reduce SUM of 1 from each rank)."""
    one = torch.ones(1, dtype=torch.int64)
    if D.world_size() > 1:
        dist.all_reduce(one)
    return int(one.item())


def train_random_steps(engine, steps: int, seed: int) -> None:
    """``steps`` optimizer steps on random byte sequences [2, 16] drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=gen)
        result = engine(x, torch.roll(x, -1, dims=1))
        engine.backward(result.loss)
        engine.step()


def engine_logits_at_ks(engine, num_experts: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The engine's logits on a fixed probe [2, 16] at k = 1, N/2, N, in eval mode -> (probe on
    the CPU, {k: logits [2, 16, V] fp32 on the CPU}); every rank feeds the same probe."""
    from smoe_ds.moe.layer import set_active_experts

    engine.eval()
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(99))
    logits = {}
    with torch.no_grad():
        for k in (1, num_experts // 2, num_experts):
            set_active_experts(engine.module, k)
            logits[k] = engine(probe.to(engine.device)).logits.float().cpu()
    return probe, logits


def finish(out_path: str, result: dict) -> None:
    """Rank 0 writes the result; every rank leaves the process group cleanly."""
    if D.is_main():
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    D.barrier()
    D.shutdown()
    sys.exit(0)
