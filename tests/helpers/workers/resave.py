"""Resume a run's newest checkpoint at this launch's layout and save it again at once, untrained.

    deepspeed --num_gpus P --module tests.helpers.workers.resave DEST --config FILE [--set KEY=VALUE ...]

The config's run.out_dir names the run; DEST receives the re-saved checkpoint, which the test
compares with the original (weights and optimizer state must be bit-identical).
"""

from __future__ import annotations

import sys
from pathlib import Path

from smoe_ds import checkpoint
from smoe_ds.cli import run_main
from smoe_ds.config.schema import config_cli
from smoe_ds.training.runtime import build_runtime
from smoe_ds.training.self_slimming import validation_loss
from tests.helpers.workers.common import worker_args


def resave(dest: str, argv: list[str]) -> None:
    cfg = config_cli(argv, "resave", "resave")()
    rt = build_runtime(cfg, training=True)
    step, _ = checkpoint.restore(rt.engine, cfg, Path(cfg.run.out_dir) / "checkpoints")
    assert step > 0, "nothing to resume"
    # What the restored weights compute, before anything else touches them (the first step after a
    # resume would see the same): a layout or stage change must not change it.
    loss = validation_loss(rt.engine, rt.val_batches(2))
    if rt.rank == 0:
        print(f"validation loss after the restore: {loss!r}", flush=True)
    checkpoint.save(rt.engine, cfg, dest, step)


if __name__ == "__main__":
    dest, *argv = worker_args()
    # run_main, as the trainer: the peers finish together, then the watchdog and the group stop
    sys.exit(run_main(lambda: resave(dest, argv)))
