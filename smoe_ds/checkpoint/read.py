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
from smoe_ds.config.schema import ConfigError, TrainConfig, config_from_dict


def saved_config(raw, where: Path, cls: type = TrainConfig) -> TrainConfig:
    """The resolved run config stored in a checkpoint (model file or meta file) at ``where``: a
    ``cls`` (the trainer's TrainConfig, or the fine-tuner's FinetuneConfig)."""
    if isinstance(raw, dict) and "hf" in raw and "hf" not in cls.SECTIONS:
        raise CheckpointError(
            f"{where} was saved by smoe-finetune: its model is the Hugging Face folder run.out_dir/model "
            "that the fine-tune exported, and smoe-finetune resumes from the checkpoint itself"
        )
    try:
        return config_from_dict(raw, cls).resolve()
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


# The keys that shape the weights, by section: the trainer's config has "model", the fine-tuner's
# "hf" (which pretrained model, which head); both have "moe". moe.d_expert is the trainer's only:
# a fine-tune's experts take their width from the pretrained FFN.
WEIGHT_KEYS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "block_size", "positions", "moe_layers", "init_seed"),
    "hf": ("model", "task", "weighting"),
    "moe": ("mode", "num_experts", "router_seed"),
}
TRAINER_WEIGHT_KEYS = {"moe": ("d_expert",)}


def model_mismatch(saved: TrainConfig, current: TrainConfig) -> str | None:
    """Every weight-shaping key on which two configs differ, as 'key: saved in the checkpoint vs current now'."""
    diffs = []
    extra = TRAINER_WEIGHT_KEYS if "model" in current.SECTIONS else {}
    for section, keys in [*WEIGHT_KEYS.items(), *extra.items()]:
        if section not in current.SECTIONS or section not in saved.SECTIONS:
            continue
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
    saved = saved_config(meta["config"], tag_dir / META_FILE, type(cfg))
    mismatch = model_mismatch(saved, cfg)
    if mismatch:
        raise CheckpointError(
            f"{tag_dir} was written by a different model ({mismatch}); "
            "use another run.out_dir, or set run.resume=false to start over there"
        )
    if "model" not in cfg.SECTIONS:
        check_same_layout(cfg, saved, tag_dir, meta)
    needed = check_files(tag_dir, saved, meta["world_size"], meta.get("moe_layers"))
    # DeepSpeed's load_checkpoint unpickles with weights_only=False: nothing else may be in them.
    shard_patterns = (ZERO_SHARD, EXPP_FILE, ZERO3_MODEL_SHARD)
    optimizer_files = sorted(f for f in tag_dir.iterdir() if any(p.match(f.name) for p in shard_patterns))
    refuse_unsafe_files(needed + optimizer_files)
    return needed


def same_layout(meta: dict, saved: TrainConfig, world_size: int, cfg: TrainConfig) -> bool:
    """Whether a checkpoint (its ``meta`` and ``saved`` config) was saved at this run's layout:
    the same world size and ep_size, and ZeRO-3 on both sides or on neither (DeepSpeed's ZeRO-3
    files, per-rank partitions, and those of the other stages do not mix)."""
    same_kind = (saved.zero_stage == 3) == (cfg.zero_stage == 3)
    return meta["world_size"] == world_size and meta["ep_size"] == cfg.moe.ep_size and same_kind


def check_same_layout(cfg: TrainConfig, saved: TrainConfig, tag_dir: Path, meta: dict) -> None:
    """A fine-tune resumes at the layout it was saved at: its checkpoint is read by DeepSpeed's own
    loader, which needs the same world size, ep_size and kind of ZeRO (smoe-ds's resharding knows
    the built-in LM's weights only)."""
    from smoe_ds.distributed import process_group as D

    def layout(world: int, ep: int, stage: int) -> str:
        return f"world size {world}, ep_size {ep}, ZeRO-{stage}"

    then = layout(meta["world_size"], meta["ep_size"], saved.zero_stage)
    now = layout(D.world_size(), cfg.moe.ep_size, cfg.zero_stage)
    if not same_layout(meta, saved, D.world_size(), cfg):
        raise CheckpointError(
            f"{tag_dir} was saved at {then}; a fine-tune resumes only at that layout, not at {now}: "
            "relaunch with the saved one, or set run.resume=false to start over"
        )


def check_files(tag_dir: Path, saved: TrainConfig, world_size: int, moe_layers: int | None = None) -> list[Path]:
    """Every file a resume reads is there and not empty, before any rank starts reading; returns them.

    ``moe_layers``: the MoE layers whose experts have files, as the save recorded it; checkpoints
    from before that record are the trainer's, whose config says it."""
    if moe_layers is not None:
        n_layers = moe_layers
    else:
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
