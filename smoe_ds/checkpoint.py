"""Reading and writing smoe-ds's DeepSpeed checkpoints.

A checkpoint folder is what ``engine.save_checkpoint`` writes under a tag (``step{N}``):
- ``mp_rank_00_model_states.pt``: the non-expert weights (frozen routers included) under
  ``module``, plus smoe-ds's own ``smoe_ds_config`` (the resolved run config) and ``step``;
- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: expert E of MoE layer L, keys in the
  per-expert layout with the global expert id;
- the ZeRO optimizer shards, and one ``rng_state_rank{r}.pt`` per rank;
- ``smoe_ds_meta.json``: step, world size, ep_size, config and the training loop's own state,
  written once all ranks are done.
A tag folder is written as ``step{N}.partial`` and renamed when complete. The folder's
``latest`` file names the newest complete tag; it is replaced atomically.
The reader needs no process group, so one process can gather any world size and ep_size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from smoe_ds import distributed as D
from smoe_ds import faults
from smoe_ds.config import ConfigError, TrainConfig, config_from_dict

MODEL_FILE = "mp_rank_00_model_states.pt"
META_FILE = "smoe_ds_meta.json"  # written last of a tag's files, by rank 0: marks it complete
PARTIAL_SUFFIX = ".partial"  # a tag folder being written; renamed to the tag once complete
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, partial, corrupt or from another model; one line."""


def save(
    engine, cfg: TrainConfig, save_dir: str | Path, step: int, keep_last: int = 0, trainer_state: dict | None = None
) -> Path:
    """Save step ``step`` crash-safely; returns the tag folder.

    Every rank writes its files (DeepSpeed's model, expert and optimizer shards, plus its own
    RNG state) into a staging folder ``step{N}.partial``; only when all ranks are done does rank
    0 write the meta file (with ``trainer_state``: what the training loop needs to continue
    exactly, such as its logging window), rename the folder to ``step{N}`` and move the
    ``latest`` pointer, atomically (write a temporary file, fsync, rename). A kill at any
    moment therefore leaves ``latest`` naming a complete checkpoint, even when the save
    replaces a folder of the same step (a run restarted with ``run.resume=false``). Then the
    oldest checkpoints beyond ``keep_last`` (0 keeps all) are removed.
    """
    save_dir, tag = Path(save_dir), f"step{step}"
    staging, tag_dir = save_dir / f"{tag}{PARTIAL_SUFFIX}", save_dir / tag
    if D.is_main():
        save_dir.mkdir(parents=True, exist_ok=True)
        current = latest_tag(save_dir)
        for left in save_dir.glob(f"*{PARTIAL_SUFFIX}"):  # from saves that were killed
            if left.name != current:
                shutil.rmtree(left)
    D.barrier()
    meta = {"step": step, "world_size": D.world_size(), "ep_size": cfg.moe.ep_size}
    engine.save_checkpoint(
        str(save_dir), tag=staging.name, client_state={"smoe_ds_config": cfg.to_dict(), **meta}, save_latest=False
    )
    torch.save(rng_states(), staging / f"rng_state_rank{D.rank()}.pt")
    faults.maybe_die("save", D.rank(), step)
    D.barrier()
    if D.is_main():
        meta = {**meta, "trainer_state": trainer_state or {}, "config": cfg.to_dict()}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tag_dir.exists():  # the same step saved before: point away from it while it is replaced
            if latest_tag(save_dir) == tag:
                _write_atomically(save_dir / "latest", staging.name)
            shutil.rmtree(tag_dir)
        os.replace(staging, tag_dir)
        _write_atomically(save_dir / "latest", tag)
        prune(save_dir, keep_last)
    D.barrier()
    return tag_dir


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _step_of(tag_dir: Path) -> int:
    m = re.fullmatch(r"step(\d+)", tag_dir.name)
    return int(m[1]) if m else -1


def prune(save_dir: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints, never the one ``latest`` names."""
    if keep_last <= 0:
        return
    current = latest_tag(save_dir)
    complete = sorted((d for d in save_dir.iterdir() if _step_of(d) >= 0 and (d / META_FILE).is_file()), key=_step_of)
    for d in complete[:-keep_last]:
        if d.name != current:
            shutil.rmtree(d, ignore_errors=True)


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag ``latest`` names, if it names a complete checkpoint.

    While a save replaces a folder of the same step, ``latest`` briefly names the staging
    folder ``step{N}.partial``; once that is renamed to ``step{N}``, the pointer follows it.
    """
    save_dir = Path(save_dir)
    pointer = save_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if tag.endswith(PARTIAL_SUFFIX) and not (save_dir / tag).exists():
        tag = tag.removesuffix(PARTIAL_SUFFIX)
    return tag if (save_dir / tag / META_FILE).is_file() else None


def latest_path(save_dir: str | Path) -> str | None:
    """The folder of the newest complete checkpoint, as a string for messages; None if there is none."""
    tag = latest_tag(save_dir)
    return str(Path(save_dir) / tag) if tag else None


def read_meta(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {tag_dir / META_FILE}: {e}") from None


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_tag_dir(path: str | Path) -> Path:
    """``path`` itself if it holds a complete checkpoint, else the tag its ``latest`` file names."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        if not (path / META_FILE).is_file():
            raise CheckpointError(
                f"{path} is an incomplete save (no {META_FILE}: not every rank finished writing it); "
                f"use a complete one, such as the tag {path.parent / 'latest'} names"
            )
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{latest} names {latest.read_text().strip()!r}, which is not a complete checkpoint")
        return path / tag
    if not path.exists():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    raise CheckpointError(f"{path} is not a DeepSpeed checkpoint: no {MODEL_FILE} and no 'latest' file")


def load_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: torch raises several kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint file {path}: {reason}") from None


def read_model(tag_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], int]:
    """The run config, every weight (experts in the per-expert layout, global ids) and the step."""
    main = load_file(tag_dir / MODEL_FILE)
    if "smoe_ds_config" not in main:
        raise CheckpointError(f"{tag_dir / MODEL_FILE} was not written by smoe-ds (it has no smoe_ds_config)")
    cfg = config_from_dict(main["smoe_ds_config"]).resolve()
    state = dict(main["module"])
    n = cfg.moe.num_experts
    n_layers = len(cfg.model.moe_layer_indices()) if cfg.uses_moe else 0
    expected = {(layer, e) for layer in range(n_layers) for e in range(n)}
    found = {}
    for f in tag_dir.iterdir():
        m = EXPERT_FILE.match(f.name)
        if m:
            found[(int(m[1]), int(m[2]))] = f
    extra = sorted(set(found) - expected)
    if extra:
        layer, e = extra[0]
        raise CheckpointError(
            f"{found[extra[0]]} does not fit the saved config ({n_layers} MoE layers x {n} experts): "
            f"the checkpoint and its config disagree on the number of experts"
        )
    for layer, e in sorted(expected):
        path = found.get((layer, e), tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
        state.update(load_file(path))
    return cfg, state, int(main.get("step", main.get("global_steps", 0)))


WEIGHT_KEYS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "block_size", "positions", "moe_layers", "init_seed"),
    "moe": ("mode", "num_experts", "d_expert", "router_seed"),
}


def model_mismatch(saved: TrainConfig, current: TrainConfig) -> str | None:
    """Every weight-shaping key on which two configs differ, as 'key: saved in the checkpoint vs current now'."""
    diffs = []
    for section, keys in WEIGHT_KEYS.items():
        for key in keys:
            a, b = getattr(getattr(saved, section), key), getattr(getattr(current, section), key)
            if a != b:
                diffs.append(f"{section}.{key}: {a!r} in the checkpoint vs {b!r} now")
    return ", ".join(diffs) or None


def check_resumable(cfg: TrainConfig, tag_dir: Path, meta: dict) -> list[Path]:
    """The checkpoint in ``tag_dir`` fits ``cfg``'s model and has every file a resume reads; returns them.

    Reads only the meta file and file sizes, so every rank can run it before any engine exists.
    """
    try:
        saved = config_from_dict(meta["config"]).resolve()
        saved_world = meta["world_size"]
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{tag_dir / META_FILE} holds no usable config ({e})") from None
    mismatch = model_mismatch(saved, cfg)
    if mismatch:
        raise CheckpointError(
            f"{tag_dir} was written by a different model ({mismatch}); "
            "use another run.out_dir, or set run.resume=false to start over there"
        )
    return check_files(tag_dir, saved, saved_world)


def restore(engine, cfg: TrainConfig, save_dir: str | Path) -> tuple[int, dict]:
    """Resume from the newest complete checkpoint in ``save_dir``; returns its step and the
    ``trainer_state`` saved with it (0 and {} if there is none).

    Same world size and ep_size: everything comes back (weights, optimizer, LR scheduler, loss
    scaler, RNG). Otherwise the weights and the LR schedule come back exactly and the optimizer
    state starts fresh, with a warning that says so.
    """
    tag = latest_tag(save_dir)
    if tag is None:
        return 0, {}
    tag_dir = Path(save_dir) / tag
    meta = read_meta(tag_dir)
    needed = check_resumable(cfg, tag_dir, meta)
    world, ep = D.world_size(), cfg.moe.ep_size
    try:
        return _load(engine, cfg, Path(save_dir), tag, meta, world, ep), meta.get("trainer_state", {})
    except CheckpointError:
        raise
    except Exception as e:  # DeepSpeed's own errors on a damaged folder: one line naming the file
        for path in needed:  # only on this failure path: find the file that does not read
            load_file(path)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot resume from {tag_dir}: {reason}") from None


def check_files(tag_dir: Path, saved: TrainConfig, world_size: int) -> list[Path]:
    """Every file a resume reads is there and not empty, before any rank starts reading; returns them."""
    n_layers = len(saved.model.moe_layer_indices()) if saved.uses_moe else 0
    needed = [tag_dir / MODEL_FILE]
    needed += [
        tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
        for layer in range(n_layers)
        for e in range(saved.moe.num_experts)
    ]
    needed += [tag_dir / f"rng_state_rank{r}.pt" for r in range(world_size)]
    for path in needed:
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"empty checkpoint file: {path}")
    return needed


def _load(engine, cfg: TrainConfig, save_dir: Path, tag: str, meta: dict, world: int, ep: int) -> int:
    tag_dir = save_dir / tag
    if meta["world_size"] == world and meta["ep_size"] == ep:
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
        rng_file = tag_dir / f"rng_state_rank{D.rank()}.pt"
        set_rng_states(torch.load(rng_file, weights_only=False))
    else:
        path, _ = engine.load_checkpoint(
            str(save_dir), tag=tag, load_module_only=True, load_optimizer_states=False, load_lr_scheduler_states=False
        )
        scheduler_state = load_file(tag_dir / MODEL_FILE).get("lr_scheduler")
        if engine.lr_scheduler is not None and scheduler_state is not None:
            engine.lr_scheduler.load_state_dict(scheduler_state)
            # The state holds the position only; re-applying it sets the optimizer groups' lr.
            engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
        saved_cfg = config_from_dict(meta["config"]).resolve()
        zero_state = read_zero_state(tag_dir, saved_cfg, meta["world_size"])
        if zero_state is not None and engine.zero_optimization_stage() in (1, 2):
            reshard_optimizer(engine, cfg, zero_state)
            resharded = True
        else:
            resharded = zero_state is None and reshard_plain_optimizer(engine, cfg, saved_cfg, tag_dir)
        fresh = "RNG states start fresh" + (
            " and the fp16 loss scale restarts from its initial value" if cfg.precision_enabled("fp16") else ""
        )
        if D.is_main():
            layout = (
                f"resuming {tag} (saved on world size {meta['world_size']}, ep_size {meta['ep_size']}) "
                f"on world size {world}, ep_size {ep}"
            )
            if resharded:
                print(
                    f"smoe-ds: {layout}: weights, fp32 master weights, Adam moments and the LR schedule "
                    f"resharded exactly; {fresh}",
                    flush=True,
                )
            else:
                print(
                    f"smoe-ds: warning: {layout}: model weights and the LR schedule are restored exactly; the "
                    "optimizer state (Adam moments and fp32 master weights) is RESET, because it can only be "
                    f"resharded between ZeRO-1/2 runs or between fp32 ZeRO-0 runs; {fresh}",
                    flush=True,
                )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    engine.global_steps = meta["step"]
    engine.global_samples = meta["step"] * engine.train_batch_size()
    return meta["step"]


ZERO_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # bf16_: ZeRO with bf16


OPTIMIZER_FIELDS = ("fp32", "exp_avg", "exp_avg_sq")


def read_zero_state(tag_dir: Path, cfg: TrainConfig, world_size: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """Full fp32 master weights and Adam moments gathered from ZeRO-1/2 shards.

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
    ep = cfg.moe.ep_size if cfg.uses_moe else 1
    n_local = cfg.moe.num_experts // ep
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
                ep_rank = rank % ep if ".deepspeed_moe.experts." in name else 0
                for field, flat in flats.items():
                    pieces.setdefault((field, name, ep_rank), []).append(flat[frag.start : frag.start + frag.numel])
    shapes = {name: shape for group in load_file(tag_dir / MODEL_FILE)["param_shapes"] for name, shape in group.items()}
    out: dict[str, dict[str, torch.Tensor]] = {field: {} for field in OPTIMIZER_FIELDS}
    out["step"] = {"step": step}
    for (field, name, ep_rank), parts in pieces.items():
        out[field].update(per_expert_entries(name, torch.cat(parts).view(shapes[name]).clone(), ep_rank, n_local))
    return out


def per_expert_entries(name: str, tensor: torch.Tensor, ep_rank: int, n_local: int) -> dict[str, torch.Tensor]:
    """A local parameter as checkpoint entries: stacked experts split per expert, global ids."""
    from smoe_ds.models.lm import global_param_name

    if name.endswith((".experts.w_in", ".experts.w_out")):
        prefix, which = name.rsplit(".", 1)
        return {
            f"{prefix}.deepspeed_experts.{ep_rank * n_local + e}.{which}.weight": (
                tensor[e] if which == "w_in" else tensor[e].t()
            ).contiguous()
            for e in range(n_local)
        }
    return {global_param_name(name, ep_rank, n_local): tensor}


def local_value(full: dict[str, torch.Tensor], name: str, ep_rank: int, n_local: int) -> torch.Tensor:
    """The inverse of ``per_expert_entries``: this rank's parameter ``name`` from global entries."""
    from smoe_ds.models.lm import global_param_name

    if name.endswith((".experts.w_in", ".experts.w_out")):
        prefix, which = name.rsplit(".", 1)
        parts = [full[f"{prefix}.deepspeed_experts.{ep_rank * n_local + e}.{which}.weight"] for e in range(n_local)]
        return torch.stack([p if which == "w_in" else p.t() for p in parts])
    return full[global_param_name(name, ep_rank, n_local)]


def reshard_optimizer(engine, cfg: TrainConfig, zero_state: dict) -> None:
    """Fill this rank's ZeRO-1/2 partitions with the saved fp32 masters and Adam moments, exactly.

    Each parameter's ``_hp_mapping`` (set by DeepSpeed) says which slice of it lives in which
    slice of this rank's flat fp32 partition; the Adam state of a partition is keyed by that
    flat tensor, so it is rebuilt here in full (torch's Adam creates its state lazily).
    """
    ep = cfg.moe.ep_size if cfg.uses_moe else 1
    ep_rank, n_local = D.rank() % ep, cfg.moe.num_experts // ep
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
                full = local_value(zero_state[field], names[id(p)], ep_rank, n_local).reshape(-1)
                target[hp.start : hp.start + hp.numel] = full[lp.start : lp.start + lp.numel].to(target.dtype)
        opt.optimizer.state[flat] = {
            "step": zero_state["step"]["step"].clone(),
            "exp_avg": targets["exp_avg"],
            "exp_avg_sq": targets["exp_avg_sq"],
        }


EXPP_FILE = re.compile(r"expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def reshard_plain_optimizer(engine, cfg: TrainConfig, saved_cfg: TrainConfig, tag_dir: Path) -> bool:
    """ZeRO-0 (fp32): fill the torch optimizer's per-parameter Adam state from the saved one.

    DeepSpeed saves, per expert-parallel rank e, the whole optimizer state dict of that rank
    (``expp_rank_{e}``). Parameters are numbered in param-group order, which is the same at
    every ep_size because stacked experts keep one tensor per layer; only their first
    dimension (the local experts) changes. Returns False when this cannot apply.
    """
    files = {int(m[1]): f for f in tag_dir.iterdir() if (m := EXPP_FILE.match(f.name))}
    saved_ep = saved_cfg.moe.ep_size if saved_cfg.uses_moe else 1
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 0 or sorted(files) != list(range(saved_ep)) or not hasattr(opt, "state"):
        return False
    saved = [load_file(files[e])["optimizer"]["state"] for e in range(saved_ep)]
    params = [p for group in opt.param_groups for p in group["params"]]
    if len(params) != len(saved[0]):
        return False
    names = {id(p): n for n, p in engine.module.named_parameters()}
    ep = cfg.moe.ep_size if cfg.uses_moe else 1
    n_local = cfg.moe.num_experts // ep
    mine = slice((D.rank() % ep) * n_local, (D.rank() % ep + 1) * n_local)
    for i, p in enumerate(params):
        if names[id(p)].endswith((".experts.w_in", ".experts.w_out")):  # gather all experts, keep this rank's
            state = {k: torch.cat([s[i][k] for s in saved])[mine] for k in ("exp_avg", "exp_avg_sq")}
        else:
            state = {k: saved[0][i][k] for k in ("exp_avg", "exp_avg_sq")}
        opt.state[p] = {"step": saved[0][i]["step"].clone(), **{k: v.clone() for k, v in state.items()}}
    return True
