"""What the trainer (``smoe_ds.train``) and the fine-tuner (``smoe_ds.finetune``) do alike.

One optimizer step over gradient_accumulation_steps good micro-batches (a NaN/inf one is
skipped everywhere and replaced), the training-loss window behind each log line, rank 0's
progress bar, and the run folder's ``config.json`` and ``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from smoe_ds.distributed import faults
from smoe_ds.distributed import process_group as D
from smoe_ds.training.numerics import BadLossGuard
from smoe_ds.training.step_breakdown import StepBreakdown

NO_BREAKDOWN = StepBreakdown(enabled=False)  # times nothing

MicroBatchLoss = Callable[[object], tuple[torch.Tensor, torch.Tensor]]
"""One micro-batch, as the data iterator yields it (on the CPU) -> (the scalar loss to
backpropagate, the scalar loss to log). The callable moves the batch to the engine's device."""


def optimizer_step(
    engine,
    batches: Iterator,
    micro_batch_loss: MicroBatchLoss,
    guard: BadLossGuard,
    step: int,
    rank: int,
    last_checkpoint: Callable[[], str | None] = lambda: None,
    breakdown: StepBreakdown = NO_BREAKDOWN,
) -> torch.Tensor:
    """One optimizer step of ``engine`` over gradient_accumulation_steps good micro-batches from
    ``batches``; returns the sum of their logged losses (a float32 scalar on the CPU).

    A micro-batch whose loss is NaN/inf on any rank is skipped everywhere before backward and
    replaced by the next one (see smoe_ds.training.numerics), so no bad gradient reaches the weights.
    ``last_checkpoint`` names the newest checkpoint for the message when too many go bad in a row.
    ``breakdown`` times each phase when enabled (``smoe_ds.training.step_breakdown``).
    """
    total, good = torch.zeros(()), 0
    while good < engine.gradient_accumulation_steps():
        with breakdown.phase("data"):
            batch = next(batches)
        with breakdown.phase("forward"):
            loss, logged = micro_batch_loss(batch)
        if faults.poisoned("train", rank, step):
            loss = loss * float("nan")
        with breakdown.phase("loss check"):
            bad = guard.bad_ranks(loss)
        if bad:
            guard.record_bad(step, bad, last_checkpoint())
            continue
        with breakdown.phase("backward"):
            engine.backward(loss)
        with breakdown.phase("optimizer step"):
            engine.step()
        total += logged.detach().float().cpu()
        good += 1
    guard.record_good()
    return total


class LossWindow:
    """The training loss summed since the last log line, over every rank's micro-batches.

    Each rank adds its own sums (float64, so the order of the additions does not show); a
    log line all-reduces them. ``state()`` (collective) folds the window into one number for
    the checkpoint, so a run resumed mid-window logs the same mean as an uninterrupted one,
    whatever the world size it resumes at.
    """

    def __init__(self, carried: float = 0.0, count: int = 0) -> None:
        self.local = torch.tensor(carried if D.is_main() else 0.0, dtype=torch.float64)
        self.count = count  # micro-batch losses in the window, over all ranks

    @classmethod
    def resumed(cls, trainer_state: dict) -> LossWindow:
        return cls(trainer_state.get("loss_window_sum", 0.0), trainer_state.get("loss_window_count", 0))

    def add(self, summed_loss: torch.Tensor, micro_batches: int) -> None:
        self.local += summed_loss.double()
        self.count += micro_batches

    def mean_and_reset(self) -> float:
        mean = float(D.all_reduce_sum(self.local) / max(self.count, 1))
        self.local, self.count = torch.zeros((), dtype=torch.float64), 0
        return mean

    def state(self) -> dict:
        return {"loss_window_sum": float(D.all_reduce_sum(self.local)), "loss_window_count": self.count}


class TrainClock:
    """Wall time spent on training steps, summed over every sitting of a resumed run.

    Periodic validations and checkpoint saves run inside ``paused()``, so the figure is the
    cost of training alone and two methods' clocks compare like for like. ``state()`` goes
    into the checkpoint and ``resumed`` reads it back, so a run interrupted and continued
    reports the time of all its steps, not only of the last sitting.
    """

    def __init__(self, carried_s: float = 0.0, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now  # seconds from any origin; tests pass a clock they move by hand
        self.carried_s = carried_s
        self.started = now()
        self.paused_s = 0.0
        self.paused_at: float | None = None  # inside paused(): the clock reads as at its start

    @classmethod
    def resumed(cls, trainer_state: dict, now: Callable[[], float] = time.perf_counter) -> TrainClock:
        return cls(trainer_state.get("train_wall_s", 0.0), now)

    def sitting_s(self) -> float:
        """Training time of this sitting only."""
        now = self.now() if self.paused_at is None else self.paused_at
        return now - self.started - self.paused_s

    def elapsed_s(self) -> float:
        """Training time of the whole run so far."""
        return self.carried_s + self.sitting_s()

    @contextlib.contextmanager
    def paused(self):
        self.paused_at = self.now()
        try:
            yield
        finally:
            self.paused_s += self.now() - self.paused_at
            self.paused_at = None

    def state(self) -> dict:
        return {"train_wall_s": self.elapsed_s()}


def progress_bar(desc: str, total: int, initial: int = 0) -> tqdm:
    """Rank 0's bar over optimizer steps (the other ranks get a disabled one)."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not D.is_main(),
        desc=desc,
        dynamic_ncols=True,
        file=sys.stdout,
        # A log file (no terminal) gets a line every 10 s instead of a redraw per step.
        mininterval=0.5 if sys.stdout.isatty() else 10.0,
    )


def write_run_config(out_dir: Path, cfg) -> None:
    """Create the run folder and write the run's whole config (any config with ``to_dict``) to
    ``config.json`` in it. Rank 0 only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def write_summary(out_dir: Path, summary: dict) -> None:
    """Write the run's ``train_summary.json`` (loss history, validations, the self-slimming rows). Rank 0 only."""
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
