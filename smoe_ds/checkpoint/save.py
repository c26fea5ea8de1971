"""Saving a checkpoint crash-safely: a staging folder, renamed when every rank is done, and an
atomically replaced ``latest`` pointer; pruning old tags."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from smoe_ds.checkpoint.files import EXPERT_FILE, META_FILE, PARTIAL_SUFFIX, latest_tag, rng_file
from smoe_ds.config.schema import TrainConfig
from smoe_ds.distributed import faults, zero3
from smoe_ds.distributed import process_group as D
from smoe_ds.moe.parallel import ep_rank_of


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
    if cfg.zero_stage == 3:  # DeepSpeed's files hold partitions only: add the whole model, as other stages have it
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        extra = {"smoe_ds_config": cfg.to_dict(), **meta, "lr_scheduler": scheduler}
        zero3.write_full_weights(engine.module, staging, ep_rank_of(D.rank(), cfg.expert_parallel_size), extra)
    torch.save(rng_states(), staging / rng_file(D.rank()))
    faults.maybe_die("save", D.rank(), step)
    D.barrier()
    if D.is_main():
        # The MoE layers with expert files, for the resume check (a fine-tuned model's count is not in its config).
        moe_layers = len({m[1] for f in staging.iterdir() if (m := EXPERT_FILE.match(f.name))})
        meta = {**meta, "moe_layers": moe_layers, "trainer_state": trainer_state or {}, "config": cfg.to_dict()}
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


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        # This rank's own GPU only: every GPU's state would fail to restore on a machine with fewer.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
