"""Optimizer state across world sizes and ep_sizes: gather it whole from a checkpoint's shards,
and fill a new engine's partitions from it exactly.

Names in the gathered state are in the checkpoint layout (per-expert, global expert ids;
``smoe_ds.moe.experts``), so the same dict serves any target layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe_ds.checkpoint.files import EXPP_FILE, MODEL_FILE, ZERO_SHARD, CheckpointError, load_file
from smoe_ds.checkpoint.reshard_common import OPTIMIZER_FIELDS, checkpoint_entries, local_value
from smoe_ds.config.schema import TrainConfig
from smoe_ds.distributed import process_group as D
from smoe_ds.moe.experts import is_stacked_expert_param
from smoe_ds.moe.parallel import ep_rank_of, local_experts


def read_zero_state(tag_dir: Path, cfg: TrainConfig, world_size: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """Full fp32 master weights and Adam moments gathered from ZeRO-1/2 shards (or ZeRO-3 ones:
    ``smoe_ds.checkpoint.reshard_zero3``).

    Returns {"fp32" | "exp_avg" | "exp_avg_sq": {name: tensor}} with names in the per-expert
    layout and global expert ids, plus {"step": {"step": tensor}}; None when there are no shards.

    Each shard names, per optimizer group, the fragment of every parameter it holds
    (``param_slice_mappings``); a parameter is the concatenation of its fragments over the
    group's data-parallel ranks in rank order. Non-expert groups span every rank; an expert
    group spans the ranks of one expert-parallel rank e (r mod ep_size == e), and its local
    experts are global experts [e * E, (e + 1) * E).
    """
    shards = {}
    for f in tag_dir.iterdir():
        m = ZERO_SHARD.match(f.name)
        if m:
            shards[int(m[1])] = f
    if not shards:
        return None
    if sorted(shards) != list(range(world_size)):
        raise CheckpointError(f"{tag_dir} has ZeRO shards for ranks {sorted(shards)}, expected 0..{world_size - 1}")
    if cfg.zero_stage == 3:
        from smoe_ds.checkpoint.reshard_zero3 import read_zero3_state

        return read_zero3_state(tag_dir, shards, cfg, world_size)
    ep = cfg.expert_parallel_size
    pieces: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    step = None
    for rank in range(world_size):
        state = load_file(shards[rank])["optimizer_state_dict"]
        adam = state["base_optimizer_state"]["state"]
        for g, mapping in enumerate(state["param_slice_mappings"]):
            flats = {"fp32": state["single_partition_of_fp32_groups"][g]}
            flats.update({key: adam[g][key] for key in ("exp_avg", "exp_avg_sq") if g in adam})
            step = adam[g]["step"] if g in adam else step
            for name, frag in mapping.items():
                ep_rank = ep_rank_of(rank, ep) if ".deepspeed_moe.experts." in name else 0
                for field, flat in flats.items():
                    pieces.setdefault((field, name, ep_rank), []).append(flat[frag.start : frag.start + frag.numel])
    shapes = {name: shape for group in load_file(tag_dir / MODEL_FILE)["param_shapes"] for name, shape in group.items()}
    out: dict[str, dict[str, torch.Tensor]] = {field: {} for field in OPTIMIZER_FIELDS}
    out["step"] = {"step": step}
    n_local = cfg.moe.num_experts // ep
    for (field, name, ep_rank), parts in pieces.items():
        out[field].update(checkpoint_entries(name, torch.cat(parts).view(shapes[name]).clone(), ep_rank, n_local))
    return out


def reshard_optimizer(engine, cfg: TrainConfig, zero_state: dict) -> None:
    """Fill this rank's ZeRO-1/2 partitions with the saved fp32 masters and Adam moments, exactly.

    Each parameter's ``_hp_mapping`` (set by DeepSpeed) says which slice of it lives in which
    slice of this rank's flat fp32 partition; the Adam state of a partition is keyed by that
    flat tensor, so it is rebuilt here in full (torch's Adam creates its state lazily).
    """
    ep = cfg.expert_parallel_size
    ep_rank = ep_rank_of(D.rank(), ep)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        targets = {"fp32": flat.data, "exp_avg": torch.zeros_like(flat.data), "exp_avg_sq": torch.zeros_like(flat.data)}
        for p in group:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no slice of this parameter on this rank
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for field, target in targets.items():
                full = local_value(zero_state[field], names[id(p)], ep_rank, ep, cfg.moe.num_experts).reshape(-1)
                target[hp.start : hp.start + hp.numel] = full[lp.start : lp.start + lp.numel].to(target.dtype)
        opt.optimizer.state[flat] = {
            "step": zero_state["step"]["step"].clone(),
            "exp_avg": targets["exp_avg"],
            "exp_avg_sq": targets["exp_avg_sq"],
        }


def reshard_plain_optimizer(engine, cfg: TrainConfig, saved_cfg: TrainConfig, tag_dir: Path) -> bool:
    """ZeRO-0 (fp32): fill the torch optimizer's per-parameter Adam state from the saved one.

    DeepSpeed saves, per expert-parallel rank e, the whole optimizer state dict of that rank
    (``expp_rank_{e}``). Parameters are numbered in param-group order, which is the same at
    every ep_size because stacked experts keep one tensor per layer; only their first
    dimension (the local experts) changes. Returns False when this cannot apply.
    """
    files = {int(m[1]): f for f in tag_dir.iterdir() if (m := EXPP_FILE.match(f.name))}
    saved_ep = saved_cfg.expert_parallel_size
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 0 or sorted(files) != list(range(saved_ep)) or not hasattr(opt, "state"):
        return False
    saved = [load_file(files[e])["optimizer"]["state"] for e in range(saved_ep)]
    params = [p for group in opt.param_groups for p in group["params"]]
    if len(params) != len(saved[0]):
        return False
    names = {id(p): n for n, p in engine.module.named_parameters()}
    ep = cfg.expert_parallel_size
    ids = local_experts(ep_rank_of(D.rank(), ep), ep, cfg.moe.num_experts)
    mine = slice(ids.start, ids.stop)
    step_on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for i, p in enumerate(params):
        if is_stacked_expert_param(names[id(p)]):  # gather all experts, keep this rank's
            state = {k: torch.cat([s[i][k] for s in saved])[mine] for k in ("exp_avg", "exp_avg_sq")}
        else:
            state = {k: saved[0][i][k] for k in ("exp_avg", "exp_avg_sq")}
        step = saved[0][i]["step"].clone()
        # Moments live where the parameter does (read from the files onto the CPU); torch's fused
        # and capturable Adam keep the step count there too.
        opt.state[p] = {
            "step": step.to(p.device) if step_on_device else step,
            **{k: v.to(p.device) for k, v in state.items()},
        }
    return True
