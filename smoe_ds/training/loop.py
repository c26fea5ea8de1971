"""The one training loop that ``smoe-train`` and ``smoe-finetune`` both run.

A command builds its engine and hands ``run_steps`` a ``Job``: the few things that differ
between a language model trained from scratch and a fine-tuned Hugging Face model (where the
micro-batches come from, the loss of one, what a periodic evaluation measures, what one
step's throughput counts). Everything else is the loop's, the same for both:

- resuming from the newest complete checkpoint in ``run.out_dir/checkpoints`` (weights,
  optimizer, LR schedule, RNG, the data position, the loss window, the clock, the histories);
- k from the schedule at every step (``smoe_ds.moe.schedule``);
- NaN/inf micro-batches skipped and replaced (``smoe_ds.training.numerics``);
- fault injection at each step (``smoe_ds.distributed.faults``), heap trimming on the CPU (``smoe_ds.training.heap``);
- rank 0's progress bar, log lines through DeepSpeed's monitor, periodic evaluations;
- checkpoints every ``run.save_interval`` steps and at the end, ``run.keep_last`` of them kept;
- the step breakdown when ``run.step_breakdown`` is on (``smoe_ds.training.step_breakdown``).

The watchdog that ends every rank when one dies is started by the command before its engine
(``smoe_ds.distributed.watchdog``), since a rank can be lost while the engine is being built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from smoe_ds import checkpoint
from smoe_ds.config.schema import TrainConfig
from smoe_ds.distributed import faults
from smoe_ds.distributed import process_group as D
from smoe_ds.moe.layer import moe_layers, set_active_experts
from smoe_ds.moe.schedule import active_k
from smoe_ds.training.heap import HeapTrimmer
from smoe_ds.training.loop_helpers import LossWindow, MicroBatchLoss, TrainClock, optimizer_step, progress_bar
from smoe_ds.training.numerics import BadLossGuard
from smoe_ds.training.step_breakdown import StepBreakdown, format_table


@dataclass
class Evaluation:
    """One periodic evaluation: its figures for the history, the monitor and the progress bar."""

    metrics: dict  # into the evaluation history, e.g. {"k=4": 1.23, "k=8": 1.19} or {"k": 4, "accuracy": 0.81}
    events: list[tuple[str, float]]  # monitor (name, value) pairs, e.g. ("Eval/loss_k=4", 1.23)
    message: str  # the progress bar's line after "step S: "


@dataclass
class Job:
    """What a command trains, and how it differs from the other command's.

    ``micro_batches(start_step, skipped)`` returns this rank's endless micro-batches from optimizer
    step ``start_step`` on, after ``skipped`` more (those skipped for NaN/inf losses before the
    checkpoint), so a resumed run reads what an uninterrupted one would.
    ``evaluate(k)`` runs collectively on every rank at k experts; the loop restores k afterwards.
    """

    engine: "deepspeed.DeepSpeedEngine"  # noqa: F821
    cfg: TrainConfig
    rank: int
    world_size: int
    micro_batches: Callable[[int, int], Iterator]
    micro_batch_loss: MicroBatchLoss
    evaluate: Callable[[int], Evaluation] | None = None
    items_per_step: int = 0  # what one optimizer step trains on, over all ranks, for the throughput
    item_name: str = "tokens"  # the unit of items_per_step: "tokens" or "examples"
    # Also evaluate before the first step and after the last, for time-to-quality curves. A
    # fine-tune leaves it off: its final self-slimming sweep evaluates at every k right after.
    evaluate_at_ends: bool = True
    name: str = "train"  # the progress bar's label


@dataclass
class LoopResult:
    start_step: int  # the step this sitting resumed from (0 for a fresh run)
    history: list[dict] = field(default_factory=list)  # log lines of the whole run, every sitting
    val_history: list[dict] = field(default_factory=list)  # periodic evaluations of the whole run
    clock: TrainClock = field(default_factory=TrainClock)
    breakdown: StepBreakdown = field(default_factory=StepBreakdown)

    sitting_s: float = 0.0  # this sitting's training time, read when the loop ended
    train_wall_s: float = 0.0  # every sitting's training time (without evaluations and saves)

    def throughput(self, job: Job) -> float:
        """Items (``job.item_name``) per second of this sitting's training steps."""
        steps = job.cfg.run.max_steps - self.start_step
        return steps * job.items_per_step / max(self.sitting_s, 1e-9)


def resume(job: Job) -> tuple[int, dict]:
    """The step to start from and the trainer state saved with it: (0, {}) unless run.resume finds a checkpoint."""
    ckpt_dir = checkpoint.checkpoint_dir(job.cfg)
    start_step, saved = checkpoint.restore(job.engine, job.cfg, ckpt_dir) if job.cfg.run.resume else (0, {})
    if start_step and D.is_main():
        print(f"resumed from {ckpt_dir / f'step{start_step}'}", flush=True)
    return start_step, saved


def expert_load_events(model: torch.nn.Module, step: int) -> list[tuple]:
    """Share of routed tokens per expert, summed over ranks, for the last forward of each layer."""
    events = []
    for layer_idx, layer in enumerate(moe_layers(model)):
        counts = layer.deepspeed_moe.exp_counts
        if counts is None:  # no forward yet (every rank alike: the same layers run on each)
            continue
        counts = D.all_reduce_sum(counts.double())
        share = (counts / counts.sum().clamp(min=1)).tolist()
        events += [(f"Train/expert_load/layer{layer_idx}/expert{e}", v, step) for e, v in enumerate(share)]
    return events


def dropped_fraction(model: torch.nn.Module) -> float | None:
    """Share of (token, route) pairs dropped for lack of capacity in the last forward, over all ranks."""
    gates = [layer.deepspeed_moe.gate for layer in moe_layers(model)]
    gates = [g for g in gates if getattr(g, "last_dropped_routes", None) is not None and g.capacity_factor]
    if not gates:
        return None
    t = torch.tensor([[float(g.last_dropped_routes), g.last_total_routes] for g in gates], dtype=torch.float64)
    t = D.all_reduce_sum(t).sum(0)
    return float(t[0] / t[1])


def log_line(job: Job, guard: BadLossGuard, bar, done: int, k: int, loss: float, per_s: float) -> dict:
    """Write step ``done``'s monitor events and progress-bar figures; returns its history entry.
    Every rank calls this (the expert loads and dropped routes are summed over ranks)."""
    engine = job.engine
    lr = engine.get_lr()[0]
    events = [("Train/loss", loss, done), ("Train/k", k, done), ("Train/lr", lr, done)]
    events += expert_load_events(engine.module, done)
    skipped = engine.skipped_steps if not guard.enabled else guard.skipped  # fp16: the loss scaler's
    if skipped:
        events.append(("Train/skipped_steps", skipped, done))
    drop = dropped_fraction(engine.module)
    unit = "tok/s" if job.item_name == "tokens" else "ex/s"
    postfix = {"loss": f"{loss:.3f}", "k": k, unit: f"{per_s:,.0f}"}
    if skipped:
        postfix["skipped"] = skipped
    if drop is not None:
        events.append(("Train/dropped_fraction", drop, done))
        postfix["dropped"] = f"{drop:.1%}"
    engine.monitor.write_events(events)
    bar.set_postfix(postfix)
    # The machine's 1-minute load average: about the number of ranks when the run had the cores
    # to itself, more when other work shared them (its timings are then not comparable).
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "step": done,
        "loss": loss,
        "k": k,
        "lr": lr,
        f"{job.item_name}_per_s": per_s,
        "skipped_steps": skipped,
        "load_avg_1m": load,
    }


def periodic_evaluation(job: Job, k: int, step: int, bar, clock: TrainClock) -> dict:
    """``job.evaluate`` at k, logged and shown, k restored afterwards; returns the history entry,
    which carries the run's training time so far, for time-to-quality comparisons."""
    with clock.paused():
        result = job.evaluate(k)
        set_active_experts(job.engine.module, k)
        job.engine.monitor.write_events([(name, value, step) for name, value in result.events])
        if D.is_main():
            bar.write(f"step {step}: {result.message}")
        return {"step": step, "train_wall_s": clock.elapsed_s(), **result.metrics}


def run_steps(job: Job) -> LoopResult:
    """Resume if there is a checkpoint, then steps start..run.max_steps with their log lines,
    evaluations and saves, then the final save. Every rank calls this."""
    cfg, engine, run = job.cfg, job.engine, job.cfg.run
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    start_step, saved = resume(job)
    gas = engine.gradient_accumulation_steps()
    # Micro-batches skipped for NaN/inf losses were read too: the data resumes after them.
    skipped_before = saved.get("skipped_micro_batches", 0)
    batches = job.micro_batches(start_step, skipped_before)
    bar = progress_bar(job.name, run.max_steps, initial=start_step)
    heap = HeapTrimmer(run.heap_trim_interval, engine.device)  # CPU runs: smoe_ds.training.heap
    clock = TrainClock.resumed(saved)
    # The first steps (a fifth of them, at most 10) warm up before the breakdown counts.
    breakdown = StepBreakdown(run.step_breakdown, warmup_steps=min(10, (run.max_steps - start_step) // 5))
    # The histories of the earlier sittings come back with the checkpoint, so the summary holds the whole run.
    history, val_history = list(saved.get("history", [])), list(saved.get("val_history", []))
    result = LoopResult(start_step, history, val_history, clock, breakdown)
    evaluates = job.evaluate is not None and run.eval_interval > 0
    if evaluates and job.evaluate_at_ends and not result.val_history:
        result.val_history.append(periodic_evaluation(job, active_k(cfg, start_step), start_step, bar, clock))
    window = LossWindow.resumed(saved)
    guard = BadLossGuard(run.max_bad_steps, enabled=not cfg.precision_enabled("fp16"))  # fp16: the loss scaler's job
    guard.skipped = skipped_before

    def save(step: int) -> None:
        with clock.paused():  # collective: every rank calls it
            state = {
                "skipped_micro_batches": guard.skipped,
                **window.state(),
                **clock.state(),
                "history": result.history,
                "val_history": result.val_history,
            }
            checkpoint.save(engine, cfg, ckpt_dir, step, run.keep_last, trainer_state=state)

    def last_checkpoint() -> str | None:  # named when too many micro-batches in a row are bad
        return checkpoint.latest_path(ckpt_dir)

    for step in range(start_step, run.max_steps):
        k = active_k(cfg, step)
        set_active_experts(engine.module, k)
        faults.maybe_die("train", job.rank, step)
        step_loss = optimizer_step(
            engine, batches, job.micro_batch_loss, guard, step, job.rank, last_checkpoint, breakdown
        )
        window.add(step_loss, gas * job.world_size)
        done = step + 1
        bar.update(1)
        if done % run.log_interval == 0 or done == run.max_steps:
            loss = window.mean_and_reset()
            per_s = (done - start_step) * job.items_per_step / clock.sitting_s()
            result.history.append(log_line(job, guard, bar, done, k, loss, per_s))
        last = done == run.max_steps
        if evaluates and ((done % run.eval_interval == 0 and not last) or (last and job.evaluate_at_ends)):
            result.val_history.append(periodic_evaluation(job, active_k(cfg, done), done, bar, clock))
        if run.save_checkpoint and run.save_interval and done % run.save_interval == 0 and not last:
            save(done)
        heap.step_done(done)
        breakdown.step_done(clock.elapsed_s())
    bar.close()
    if run.save_checkpoint and start_step < run.max_steps:
        save(run.max_steps)
    # Read now: what runs after the loop (the final sweep, the export) is not training.
    result.sitting_s, result.train_wall_s = clock.sitting_s(), clock.elapsed_s()
    return result


def report_breakdown(result: LoopResult, label: str) -> dict | None:
    """The step breakdown's summary over ranks (collective), printed by rank 0; None when it was off."""
    summary = result.breakdown.summary()
    if summary and D.is_main():
        print(f"step breakdown, mean over ranks of {summary['measured_steps']} steps:", flush=True)
        print(format_table({label: summary}), flush=True)
    return summary
