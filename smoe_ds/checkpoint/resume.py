"""Resuming training from the newest complete checkpoint, at the saved or another layout."""

from __future__ import annotations

from pathlib import Path

from smoe_ds.checkpoint.files import MODEL_FILE, CheckpointError, latest_tag, load_file, read_meta, rng_file
from smoe_ds.checkpoint.read import check_resumable, model_mismatch, read_model, same_layout, saved_config
from smoe_ds.checkpoint.reshard import read_zero_state, reshard_optimizer, reshard_plain_optimizer
from smoe_ds.checkpoint.reshard_zero3 import reshard_zero3_optimizer
from smoe_ds.checkpoint.save import set_rng_states
from smoe_ds.config.schema import TrainConfig
from smoe_ds.distributed import process_group as D
from smoe_ds.distributed.zero3 import load_full_state
from smoe_ds.moe.parallel import ep_rank_of


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
        return _load(engine, cfg, Path(save_dir), tag, meta, world, ep), meta["trainer_state"]
    except CheckpointError:
        raise
    except Exception as e:  # DeepSpeed's own errors on a damaged folder: one line naming the file
        for path in needed:  # only on this failure path: find the file that does not read
            load_file(path)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot resume from {tag_dir}: {reason}") from None


def _load(engine, cfg: TrainConfig, save_dir: Path, tag: str, meta: dict, world: int, ep: int) -> int:
    tag_dir = save_dir / tag
    saved_cfg = saved_config(meta["config"], tag_dir, type(cfg))
    if same_layout(meta, saved_cfg, world, cfg):
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
        set_rng_states(load_file(tag_dir / rng_file(D.rank())))
    else:
        if saved_cfg.zero_stage == 3 or cfg.zero_stage == 3:
            path = load_weights(engine, cfg, tag_dir)
        else:
            path, _ = engine.load_checkpoint(
                str(save_dir),
                tag=tag,
                load_module_only=True,
                load_optimizer_states=False,
                load_lr_scheduler_states=False,
            )
        scheduler_state = load_file(tag_dir / MODEL_FILE).get("lr_scheduler")
        if engine.lr_scheduler is not None and scheduler_state is not None:
            engine.lr_scheduler.load_state_dict(scheduler_state)
            # The state holds the position only; re-applying it sets the optimizer groups' lr.
            engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
        zero_state = read_zero_state(tag_dir, saved_cfg, meta["world_size"])
        if zero_state is not None and engine.zero_optimization_stage() in (1, 2):
            reshard_optimizer(engine, cfg, zero_state)
            resharded = True
        elif zero_state is not None and engine.zero_optimization_stage() == 3:
            reshard_zero3_optimizer(engine, cfg, zero_state)
            resharded = True
        else:
            resharded = zero_state is None and reshard_plain_optimizer(engine, cfg, saved_cfg, tag_dir)
        _report_reshard(cfg, tag, meta, world, ep, resharded, saved_cfg.zero_stage)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    engine.global_steps = meta["step"]
    engine.global_samples = meta["step"] * engine.train_batch_size()
    return meta["step"]


def load_weights(engine, cfg: TrainConfig, tag_dir: Path) -> str:
    """The weights from the checkpoint's whole-model files (``read_model``) into this rank's share of
    the engine's parameters, at any stage, world size and ep_size, and the optimizer's fp32 master
    copies refreshed from them; returns the folder. Used for a layout change to or from ZeRO-3,
    where DeepSpeed's own loader reads only files of its own stage, and by ``smoe_ds.evaluate``."""
    saved, state, _ = read_model(tag_dir)
    mismatch = model_mismatch(saved, cfg)
    if mismatch:
        raise CheckpointError(f"{tag_dir} was written by a different model ({mismatch})")
    load_full_state(engine.module, state, ep_rank_of(D.rank(), cfg.expert_parallel_size))
    if engine.optimizer is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    return str(tag_dir)


def _report_reshard(
    cfg: TrainConfig, tag: str, meta: dict, world: int, ep: int, resharded: bool, saved_stage: int
) -> None:
    if not D.is_main():
        return
    fresh = "RNG states start fresh" + (
        " and the fp16 loss scale restarts from its initial value" if cfg.precision_enabled("fp16") else ""
    )
    layout = (
        f"resuming {tag} (saved on world size {meta['world_size']}, ep_size {meta['ep_size']}, "
        f"ZeRO-{saved_stage}) on world size {world}, ep_size {ep}, ZeRO-{cfg.zero_stage}"
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
            f"resharded between ZeRO-1/2/3 runs or between fp32 ZeRO-0 runs; {fresh}",
            flush=True,
        )
