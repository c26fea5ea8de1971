"""The training runs the resume and resharding tests share: tests/configs/e2e_tiny.json with a fixed
k schedule and LR schedule, so runs of any length agree step for step, and their logged losses."""

from __future__ import annotations

import csv

from tests.helpers.launch import REPO

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
STEPS = 120


def fixed_schedules(steps: int, save_interval: int) -> list[str]:
    """Overrides that make runs of ``steps`` steps agree step for step whatever their max_steps, and
    log every step's loss."""
    return [
        f"run.max_steps={steps}",
        f"run.save_interval={save_interval}",
        "run.keep_last=2",
        "run.log_interval=1",
        "run.eval_interval=0",
        f"moe.k_schedule.end_step={steps}",  # fixed, so every run agrees whatever its max_steps
        f"scheduler.params.total_num_steps={steps}",
    ]


COMMON = fixed_schedules(STEPS, 30)


def trainer_args(config: str, sets: list[str]) -> list[str]:
    """``smoe_ds.train --config CONFIG --set ...``, for the launch helpers' module form."""
    return ["smoe_ds.train", "--config", config] + sum([["--set", s] for s in sets], [])


def args_for(out_dir, *extra):
    return trainer_args(CONFIG, [*COMMON, f"run.out_dir={out_dir}", *extra])


def losses(out_dir) -> dict[int, float]:
    """Step -> logged training loss; a step logged twice (before a kill and after) keeps the last."""
    (path,) = (out_dir / "monitor").rglob("Train_loss.csv")
    rows = [r for r in csv.reader(open(path)) if r and r[0] != "step"]
    return {int(float(r[0])): float(r[1]) for r in rows}
