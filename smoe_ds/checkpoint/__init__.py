"""smoe-ds's DeepSpeed checkpoints: saving, reading, resuming and resharding them.

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

Modules, one job each: ``files`` (names, safe loading, the meta file, finding the newest
complete tag), ``save`` (atomic saves and pruning), ``read`` (the model and resumability
checks), ``reshard`` (optimizer state across layouts) and ``resume`` (restoring an engine).
"""

from smoe_ds.checkpoint.files import (
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    checkpoint_dir,
    latest_path,
    latest_tag,
    load_file,
    read_meta,
    resolve_tag_dir,
)
from smoe_ds.checkpoint.read import check_resumable, read_model
from smoe_ds.checkpoint.reshard import read_zero_state
from smoe_ds.checkpoint.resume import load_weights, restore
from smoe_ds.checkpoint.save import save

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "CheckpointError",
    "check_resumable",
    "checkpoint_dir",
    "latest_path",
    "latest_tag",
    "load_weights",
    "load_file",
    "read_meta",
    "read_model",
    "read_zero_state",
    "resolve_tag_dir",
    "restore",
    "save",
]
