"""ZeRO-3 optimizer state across layouts: gather it whole from a ZeRO-3 checkpoint's shards, and fill
a ZeRO-3 engine's partitions from a whole state (read from ZeRO-1/2 or ZeRO-3 shards).

The whole state has the layout of ``read_zero_state``: {"fp32" | "exp_avg" | "exp_avg_sq": {name:
tensor}} with experts per expert under global ids, plus {"step": {"step": tensor}}; so ZeRO-3 and
ZeRO-1/2 checkpoints reshard into each other (``smoe_ds.checkpoint.reshard`` fills ZeRO-1/2).

A ZeRO-3 shard holds, per optimizer sub-group, one flat fp32 partition (and Adam's moments, laid out
the same): each parameter of the sub-group, in the order its rank's model file lists them
(``param_shapes``), contributes its partition of ceil(numel / G) elements, G being the number of
ranks the sub-group is split over. The shard names those ranks (``ds_zero_partition_groups``:
every rank for non-expert weights, the ranks holding the same experts for expert weights).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from smoe_ds.checkpoint.files import CheckpointError, load_file, zero3_model_file
from smoe_ds.checkpoint.reshard_common import OPTIMIZER_FIELDS, checkpoint_entries, local_value
from smoe_ds.config.schema import TrainConfig
from smoe_ds.distributed import process_group as D
from smoe_ds.moe.parallel import ep_rank_of

FIELDS = {"fp32": None, "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}  # field -> DeepSpeed's state key


def read_zero3_state(tag_dir: Path, shards: dict[int, Path], cfg: TrainConfig, world_size: int) -> dict:
    """The whole fp32 masters and Adam moments from a ZeRO-3 checkpoint's optimizer ``shards``
    ({rank: file}), in ``read_zero_state``'s layout."""
    ep, n_local = cfg.expert_parallel_size, cfg.moe.num_experts // cfg.expert_parallel_size
    # (field, name) -> {rank in its partition group: this rank's partition}
    parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    shapes, owners, step = {}, {}, None
    for rank in range(world_size):
        groups = load_file(tag_dir / zero3_model_file(rank))["param_shapes"]  # names a missing file
        state = load_file(shards[rank])["optimizer_state_dict"]
        adam = state["optimizer_state_dict"]["state"]
        for g, (names, placement) in enumerate(zip(groups, state["ds_zero_partition_groups"])):
            flats = {"fp32": state["fp32_flat_groups"][g]}
            flats.update({field: adam[g][key] for field, key in FIELDS.items() if key and g in adam})
            step = adam[g]["step"] if g in adam else step
            size, offset = placement["partition_count"], 0
            for name, shape in names.items():
                n = math.ceil(math.prod(shape) / size)
                # an expert weight belongs to the expert-parallel rank of the ranks that hold it
                owner = (name, ep_rank_of(rank, ep) if ".deepspeed_moe.experts." in name else 0)
                shapes[owner], owners[owner] = tuple(shape), placement["partition_ranks"]
                for field, flat in flats.items():
                    parts.setdefault((field, *owner), {})[placement["partition_rank"]] = flat[offset : offset + n]
                offset += n
    out: dict[str, dict[str, torch.Tensor]] = {field: {} for field in OPTIMIZER_FIELDS}
    out["step"] = {"step": step}
    for (field, name, ep_rank), by_rank in parts.items():
        if sorted(by_rank) != list(range(len(owners[(name, ep_rank)]))):
            raise CheckpointError(f"{tag_dir}: the ZeRO-3 shards do not hold every partition of {name}")
        numel = math.prod(shapes[(name, ep_rank)])
        whole = torch.cat([by_rank[i] for i in sorted(by_rank)])[:numel].view(shapes[(name, ep_rank)])
        out[field].update(checkpoint_entries(name, whole.clone(), ep_rank, n_local))
    return out


def reshard_zero3_optimizer(engine, cfg: TrainConfig, zero_state: dict) -> None:
    """Fill this rank's ZeRO-3 partitions of the fp32 masters and Adam moments from a whole state,
    exactly (no collective: each rank copies its own slices, through DeepSpeed's setters)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ep = cfg.expert_parallel_size
    ep_rank = ep_rank_of(D.rank(), ep)
    opt = engine.optimizer
    step = zero_state["step"]["step"]
    for flat in opt.fp32_partitioned_groups_flat:  # ZeRO-3 leaves Adam's state to its first step
        opt.optimizer.state[flat] = {
            "step": adam_step(opt.optimizer, step, flat.device),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for field, key in FIELDS.items():
            whole = local_value(zero_state[field], name, ep_rank, ep, cfg.moe.num_experts).to(torch.float32)
            if key is None:
                safe_set_full_fp32_param(p, whole)
            else:
                safe_set_full_optimizer_state(p, whole, key)


def adam_step(optimizer, step, device: torch.device):
    """Adam's step count as ``optimizer`` keeps it: torch's Adam/AdamW a float32 tensor (on the
    parameters' device when fused or capturable), DeepSpeed's CPU and fused Adam an int."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return int(step)
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")
