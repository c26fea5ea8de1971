"""The training runs the resume and resharding tests share: tests/configs/e2e_tiny.json with a fixed
k schedule and LR schedule, so runs of any length agree step for step, and their logged losses."""

from __future__ import annotations

import csv

from tests.helpers.launch import REPO

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
STEPS = 120
COMMON = [
    f"run.max_steps={STEPS}",
    "run.save_interval=30",
    "run.keep_last=2",
    "run.log_interval=1",
    "run.eval_interval=0",
    f"moe.k_schedule.end_step={STEPS}",  # fixed, so every run agrees whatever its max_steps
    f"scheduler.params.total_num_steps={STEPS}",
]


def args_for(out_dir, *extra):
    sets = [*COMMON, f"run.out_dir={out_dir}", *extra]
    return ["smoe_ds.train", "--config", CONFIG] + sum([["--set", s] for s in sets], [])


def losses(out_dir) -> dict[int, float]:
    """Step -> logged training loss; a step logged twice (before a kill and after) keeps the last."""
    (path,) = (out_dir / "monitor").rglob("Train_loss.csv")
    rows = [r for r in csv.reader(open(path)) if r and r[0] != "step"]
    return {int(float(r[0])): float(r[1]) for r in rows}
