"""Checks of the data and the run folder that must pass before anything heavy or written.

``build_runtime`` calls these after the config checks and before the DeepSpeed engine exists:
a bad corpus, a batch that the data cannot fill, a run folder that cannot be written or a
checkpoint from another model then costs seconds, not a run, and leaves ``run.out_dir``
untouched. Each check runs on every rank and fails the same way everywhere, so every rank
stops with the same ``ConfigError`` (printed once, by rank 0) and none is left waiting in a
collective for a peer that already gave up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from smoe_ds import checkpoint
from smoe_ds.config.schema import ConfigError, TrainConfig
from smoe_ds.data import Corpus, eval_batches, load_corpus, train_steps_per_epoch
from smoe_ds.distributed import process_group as D

T = TypeVar("T")


def check_out_dir(out_dir: str) -> None:
    """``run.out_dir`` is (or can be made) a folder this user can write into; nothing is created.

    The test is the nearest existing folder on the path: it must be a folder, writable, on a
    writable file system. ``os.access`` says yes to root for any folder whatever its mode bits
    (and, wrongly, for /proc and /sys), so for root this catches a parent that is a regular
    file and a read-only mount (``access`` reports EROFS even to root), not a chmod.
    """
    path = Path(out_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"run.out_dir {out_dir} cannot be created: {existing} is a file, not a folder; choose another run.out_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"run.out_dir {out_dir} {what} by this user; choose another run.out_dir")
    ckpt_dir = path / "checkpoints"
    if ckpt_dir.exists() and not (ckpt_dir.is_dir() and os.access(ckpt_dir, os.W_OK | os.X_OK)):
        raise ConfigError(f"{ckpt_dir} is not a writable folder; remove it or choose another run.out_dir")


def check_precision(cfg: TrainConfig) -> None:
    """fp16/bf16 are enabled only where DeepSpeed's accelerator supports them (no fp16 on CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for kind, supported in (("fp16", acc.is_fp16_supported()), ("bf16", acc.is_bf16_supported())):
        if cfg.precision_enabled(kind) and not supported:
            raise ConfigError(
                f"{kind}.enabled is true, but DeepSpeed's {acc.device_name()} accelerator has no {kind}; "
                f"set {kind}.enabled=false ({'bf16 or ' if kind == 'fp16' else ''}fp32 instead)"
            )


def load_corpus_on_every_rank(cfg: TrainConfig) -> Corpus:
    """``load_corpus``, local rank 0 first (it fills the datasets cache), then the others."""
    return on_every_rank(lambda: load_corpus(cfg.data, cfg.model.block_size))


def on_every_rank(load: Callable[[], T]) -> T:
    """``load()`` (e.g. reading data through the datasets cache), local rank 0 first, then the others.

    A ConfigError on local rank 0 is raised only after it has released the others, which then
    load and fail the same way, so no rank waits for one that already stopped.
    """
    error = None
    with D.local_main_first():
        try:
            result = load()
        except ConfigError as e:
            error = e
    if error is not None:
        raise error
    return result


def check_validation(cfg: TrainConfig, corpus: Corpus, world_size: int) -> None:
    """The validation split fills at least one micro-batch on every rank."""
    eval_batches(corpus.val_blocks, cfg.micro_batch_size(world_size), D.rank(), world_size, cfg.run.eval_batches)


def check_training(cfg: TrainConfig, corpus: Corpus, world_size: int) -> None:
    """The training split fills one optimizer step, and with ``run.resume`` a checkpoint in
    ``run.out_dir/checkpoints`` is complete and was written by this model.

    The resume check reads the checkpoint's ``smoe_ds_meta.json`` and file sizes only, and
    compares the model shape key by key (``cfg.model.vocab_size`` included: call this after
    the corpus is loaded).
    """
    micro = cfg.micro_batch_size(world_size)
    train_steps_per_epoch(len(corpus.train_blocks), micro, world_size, cfg.grad_accum_steps(world_size))
    check_checkpoint_to_resume(cfg)


def check_checkpoint_to_resume(cfg: TrainConfig) -> None:
    """With ``run.resume``, the newest checkpoint in ``run.out_dir/checkpoints`` (if any) is
    complete and fits this run (``smoe_ds.checkpoint.check_resumable``)."""
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    tag = checkpoint.latest_tag(ckpt_dir) if cfg.run.resume else None
    if tag is not None:
        tag_dir = ckpt_dir / tag
        checkpoint.check_resumable(cfg, tag_dir, checkpoint.read_meta(tag_dir))
