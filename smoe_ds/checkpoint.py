"""Reading and writing smoe-ds's DeepSpeed checkpoints.

A checkpoint folder is what ``engine.save_checkpoint`` writes under a tag (``step{N}``):
- ``mp_rank_00_model_states.pt``: the non-expert weights (frozen routers included) under
  ``module``, plus smoe-ds's own ``smoe_ds_config`` (the resolved run config) and ``step``;
- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: expert E of MoE layer L, keys in the
  per-expert layout with the global expert id;
- the ZeRO optimizer shards.
The reader needs no process group, so one process can gather any world size and ep_size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from smoe_ds.config import ConfigError, TrainConfig, config_from_dict

MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, partial, corrupt or from another model; one line."""


def save(engine, cfg: TrainConfig, save_dir: str | Path, step: int) -> None:
    """Save through DeepSpeed with the run config inside, so the folder describes itself."""
    engine.save_checkpoint(
        str(save_dir), tag=f"step{step}", client_state={"smoe_ds_config": cfg.to_dict(), "step": step}
    )


def resolve_tag_dir(path: str | Path) -> Path:
    """``path`` itself if it holds a checkpoint, else the tag its ``latest`` file names."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        tag_dir = path / latest.read_text().strip()
        if not (tag_dir / MODEL_FILE).is_file():
            raise CheckpointError(f"{latest} names {tag_dir.name}, which holds no {MODEL_FILE}")
        return tag_dir
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
