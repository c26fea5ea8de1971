"""Reading a checkpoint's model and checking that a folder can be resumed or converted.

The reader needs no process group, so one process can gather any world size and ep_size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoe_ds.checkpoint.files import (
    EXPERT_FILE,
    EXPP_FILE,
    META_FILE,
    MODEL_FILE,
    ZERO3_MODEL_SHARD,
    ZERO_SHARD,
    CheckpointError,
    expert_file,
    load_file,
    refuse_unsafe_files,
    rng_file,
)
from smoe_ds.config import ConfigError, TrainConfig, config_from_dict


def saved_config(raw, where: Path) -> TrainConfig:
    """The resolved run config stored in a checkpoint (model file or meta file) at ``where``."""
    try:
        return config_from_dict(raw).resolve()
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where} holds no usable config ({e})") from None


def read_model(tag_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], int]:
    """The run config, every weight (experts in the per-expert layout, global ids) and the step."""
    main = load_file(tag_dir / MODEL_FILE)
    if not isinstance(main, dict) or "smoe_ds_config" not in main:
        raise CheckpointError(f"{tag_dir / MODEL_FILE} was not written by smoe-ds (it has no smoe_ds_config)")
    cfg = saved_config(main["smoe_ds_config"], tag_dir / MODEL_FILE)
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
        raise CheckpointError(
            f"{found[extra[0]]} does not fit the saved config ({n_layers} MoE layers x {n} experts): "
            f"the checkpoint and its config disagree on the number of experts"
        )
    for layer, e in sorted(expected):
        state.update(load_file(found.get((layer, e), tag_dir / expert_file(layer, e))))
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
    """The checkpoint in ``tag_dir`` fits ``cfg``'s model and has every file a resume reads, each
    holding only types smoe-ds and DeepSpeed write; returns those files.

    Reads the meta file, file sizes and the files' pickled type names (never their contents),
    so every rank can run it before any engine exists.
    """
    saved = saved_config(meta["config"], tag_dir / META_FILE)
    mismatch = model_mismatch(saved, cfg)
    if mismatch:
        raise CheckpointError(
            f"{tag_dir} was written by a different model ({mismatch}); "
            "use another run.out_dir, or set run.resume=false to start over there"
        )
    needed = check_files(tag_dir, saved, meta["world_size"])
    # DeepSpeed's load_checkpoint unpickles with weights_only=False: nothing else may be in them.
    shard_patterns = (ZERO_SHARD, EXPP_FILE, ZERO3_MODEL_SHARD)
    optimizer_files = sorted(f for f in tag_dir.iterdir() if any(p.match(f.name) for p in shard_patterns))
    refuse_unsafe_files(needed + optimizer_files)
    return needed


def check_files(tag_dir: Path, saved: TrainConfig, world_size: int) -> list[Path]:
    """Every file a resume reads is there and not empty, before any rank starts reading; returns them."""
    n_layers = len(saved.model.moe_layer_indices()) if saved.uses_moe else 0
    needed = [tag_dir / MODEL_FILE]
    needed += [tag_dir / expert_file(layer, e) for layer in range(n_layers) for e in range(saved.moe.num_experts)]
    needed += [tag_dir / rng_file(r) for r in range(world_size)]
    for path in needed:
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"empty checkpoint file: {path}")
    return needed
