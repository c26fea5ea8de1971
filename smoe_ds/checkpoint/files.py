"""A checkpoint folder's files: their names, reading them safely, and finding the newest complete tag.

Reading never runs code. ``torch.load`` with ``weights_only=False`` unpickles whatever a file
holds, and a pickle can call any function (``os.system`` included), so a checkpoint downloaded
from elsewhere could run code the moment it is converted. Every file smoe-ds reads is loaded
with ``weights_only=True``, allowing only the few non-tensor types DeepSpeed and smoe-ds write
(``SAFE_GLOBALS``). Before DeepSpeed's own ``engine.load_checkpoint`` reads a folder (it loads
with ``weights_only=False``), ``refuse_unsafe_files`` scans each file's pickle without running
it and refuses any other type.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from smoe_ds.config.schema import ConfigError

MODEL_FILE = "mp_rank_00_model_states.pt"
META_FILE = "smoe_ds_meta.json"  # written last of a tag's files, by rank 0: marks it complete
PARTIAL_SUFFIX = ".partial"  # a tag folder being written; renamed to the tag once complete
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
ZERO_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # bf16_: ZeRO with bf16
ZERO3_MODEL_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")  # ZeRO-3: each rank's partitions
EXPP_FILE = re.compile(r"expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # ZeRO-0: one optimizer per EP rank


class CheckpointError(ConfigError):
    """A checkpoint that is missing, partial, corrupt, unsafe or from another model; one line."""


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def zero3_model_file(rank: int) -> str:
    """DeepSpeed's ZeRO-3 file of ``rank``'s weight partitions (and the parameter names and shapes)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def _safe_globals() -> list:
    """The non-tensor types a smoe-ds checkpoint may hold, beyond what ``weights_only`` allows anyway
    (tensors, dicts, lists, tuples, torch.Size, OrderedDict, numbers, strings)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # ZeRO shards: the loss scaler's state (static, and dynamic under fp16)
        DynamicLossScaler,
        ZeroStageEnum,  # ZeRO shards: the stage
        fragment_address,  # ZeRO shards: where each parameter's slice lies in the flat partition
        # the RNG files: numpy's generator state is a uint32 array
        np._core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def refuse_unsafe(path: Path) -> None:
    """Refuse ``path`` if its pickle names any type outside ``SAFE_GLOBALS``; runs nothing from it."""
    allowed = {_global_name(g) for g in _safe_globals()}
    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception as e:  # not a zip archive, truncated: torch raises several kinds
        raise CheckpointError(f"cannot read checkpoint file {path}: {_first_line(e)}") from None
    if unsafe:
        raise CheckpointError(
            f"refusing {path}: it holds {unsafe[0]}, which is not a type smoe-ds or DeepSpeed writes "
            "(loading it could run code)"
        )


def refuse_unsafe_files(paths: list[Path]) -> None:
    for path in paths:
        refuse_unsafe(path)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_file(path: Path) -> dict:
    """One checkpoint file, loaded onto the CPU with ``weights_only=True`` and the allow-list."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or unsafe: torch raises several kinds
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            refuse_unsafe(path)  # names the offending type in one line
        raise CheckpointError(f"cannot read checkpoint file {path}: {_first_line(e)}") from None


# The meta file's keys and their types; trainer_state is optional (older checkpoints lack it).
META_KEYS = {"step": int, "world_size": int, "ep_size": int, "config": dict}


def read_meta(tag_dir: Path) -> dict:
    """The tag's ``smoe_ds_meta.json``, checked: step, world_size and ep_size integers (the sizes at
    least 1), config a mapping, trainer_state a mapping if present."""
    path = tag_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    for key, kind in META_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"{path} has no {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
        if key in ("world_size", "ep_size") and value < 1:
            raise CheckpointError(f"{path}: {key!r} must be at least 1, got {value}")
    if not isinstance(meta.setdefault("trainer_state", {}), dict):
        raise CheckpointError(f"{path}: 'trainer_state' must be an object, got {meta['trainer_state']!r}")
    return meta


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


def checkpoint_dir(cfg) -> Path:
    """Where a run (``TrainConfig`` or ``FinetuneConfig``) saves and finds its checkpoints."""
    return Path(cfg.run.out_dir) / "checkpoints"
