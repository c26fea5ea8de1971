"""Resume a run's newest checkpoint at this launch's layout and save it again at once, untrained.

    deepspeed --num_gpus P --module tests.workers.resave DEST --config FILE [--set KEY=VALUE ...]

The config's run.out_dir names the run; DEST receives the re-saved checkpoint, which the test
compares with the original (weights and optimizer state must be bit-identical).
"""

from __future__ import annotations

from pathlib import Path

from smoe_ds import checkpoint
from smoe_ds import distributed as D
from smoe_ds.config import config_cli
from smoe_ds.runtime import build_runtime
from tests.workers.common import worker_args


def main() -> None:
    dest, *argv = worker_args()
    cfg = config_cli(argv, "resave", "resave")()
    rt = build_runtime(cfg, training=True)
    step, _ = checkpoint.restore(rt.engine, cfg, Path(cfg.run.out_dir) / "checkpoints")
    assert step > 0, "nothing to resume"
    checkpoint.save(rt.engine, cfg, dest, step)
    D.shutdown()


if __name__ == "__main__":
    main()
