"""One timed trial: a candidate config trained for a few steps by smoe-train, as users launch it.

Each trial lives in ``OUT/trials/<name>/``: ``config.json`` (the candidate, exactly the file a user
would run), ``run/`` (the trainer's folder), ``log.txt`` (its output) and ``result.json``, written
last. A trial with a ``result.json`` is done, and a tuner that starts again reads it instead of
running it again; a trial without one (killed mid-way) runs again from the start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from smoe_ds.bench.runs import trainer_command
from smoe_ds.config.schema import TrainConfig

# Steps whose time the throughput leaves out: the first ones pay for allocator growth, op loading
# and the first collectives of each kind.
WARMUP_FRACTION = 0.25


@dataclass
class TrialResult:
    tokens_per_s: float | None  # over the steps after warm-up; None when the trial failed
    model_state_bytes: int | None  # the largest rank's weights + masters + moments, from its engine
    peak_rss_bytes: int | None  # the largest rank's peak resident memory (the process included)
    wall_s: float  # the whole launch, start-up included
    error: str | None = None  # the trainer's last output line when it failed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def trial_overrides(cfg: TrainConfig, steps: int, out_dir: Path) -> list[str]:
    """``--set`` items that make ``cfg``'s job a trial: ``steps`` steps, no evaluation, no checkpoint,
    a log line (with its throughput) every step, and the k schedule compressed into those steps
    so the trial runs the job's mix of k, not only its first k."""
    items = [
        f"run.out_dir={out_dir}",
        f"run.max_steps={steps}",
        "run.log_interval=1",
        "run.eval_interval=0",
        "run.save_checkpoint=false",
        "run.resume=false",
        "run.final_eval_batches=1",
        "run.eval_ks=[1]",
    ]
    ks = cfg.moe.k_schedule
    if cfg.moe.mode == "smoe_dropout":
        scale = steps / cfg.run.max_steps
        items += [
            f"moe.k_schedule.start_step={int(ks.start_step * scale)}",
            f"moe.k_schedule.end_step={max(int(ks.start_step * scale), round(ks.end_step * scale))}",
            f"moe.k_schedule.milestones={json.dumps([int(m * scale) for m in ks.milestones])}",
        ]
    return items


def steady_tokens_per_s(history: list[dict], items_per_step: int) -> float:
    """Tokens/s over the logged steps after warm-up. Each log line's ``tokens_per_s`` is the mean
    since the start of training, so the time to step s is s * items / that; the difference between
    two such times is the steady stretch's."""
    if len(history) < 2:
        raise ValueError("a trial needs at least two logged steps")
    first = history[min(len(history) - 2, max(1, int(len(history) * WARMUP_FRACTION)) - 1)]
    last = history[-1]
    elapsed = lambda h: h["step"] * items_per_step / h["tokens_per_s"]  # noqa: E731
    return (last["step"] - first["step"]) * items_per_step / (elapsed(last) - elapsed(first))


class OutOfTime(Exception):
    """The tuning's time budget ended during a trial: it was stopped, and runs again next sitting."""


def run_trial(
    folder: Path,
    raw: dict,
    cfg: TrainConfig,
    ranks: int,
    steps: int,
    tokens_per_step: int,
    budget_s: float,
    hang_s: float | None,
) -> TrialResult:
    """Train candidate ``raw`` (loaded: ``cfg``) for ``steps`` steps on ``ranks`` local ranks in
    ``folder``; its result is also written to ``folder/result.json``.

    A trial still running after ``hang_s`` (None: no limit of its own) is stopped and recorded as
    failed. One still running when the budget's ``budget_s`` end is stopped and raises OutOfTime,
    with nothing recorded."""
    if folder.exists():
        shutil.rmtree(folder)  # a trial killed before its result: start it over
    folder.mkdir(parents=True)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
    cmd = trainer_command(config_path, ranks, trial_overrides(cfg, steps, folder / "run"))
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        # A session of its own, so that a trial past its time is stopped with every rank it started.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        limit = budget_s if hang_s is None else min(budget_s, hang_s)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if hang_s is None or budget_s <= hang_s:
                raise OutOfTime() from None
            code = None
    wall = time.perf_counter() - start
    summary_path = folder / "run" / "train_summary.json"
    if code != 0 or not summary_path.exists():
        why = (
            f"no result after {hang_s:.0f} s: stopped"
            if code is None
            else f"exit {code}: {last_line(folder / 'log.txt')}"
        )
        result = TrialResult(None, None, None, wall, why)
    else:
        summary = json.loads(summary_path.read_text())
        ranks_memory = summary["memory_per_rank"]
        result = TrialResult(
            tokens_per_s=steady_tokens_per_s(summary["history"], tokens_per_step),
            model_state_bytes=max(r["parameters"] + r["master_weights"] + r["optimizer_moments"] for r in ranks_memory),
            peak_rss_bytes=max(r["peak_rss"] for r in ranks_memory),
            wall_s=wall,
        )
    (folder / "result.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return result


def read_trial(folder: Path) -> TrialResult | None:
    """A finished trial's result, or None if it has not finished."""
    path = folder / "result.json"
    return TrialResult(**json.loads(path.read_text())) if path.exists() else None


# What a failed trainer's own last words look like: smoe-ds's one-line error, or an exception's line.
_ERROR_LINE = re.compile(r"^(smoe-ds: error: .*|[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*)$")


def last_line(log: Path) -> str:
    """Why a trial failed: the last error line in its log (the launcher's own lines come after
    the ranks' and say only that it killed them), else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or ["no output"])[-1][:300]
