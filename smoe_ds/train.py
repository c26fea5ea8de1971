"""Train an SMoE-Dropout language model with DeepSpeed expert parallelism and ZeRO.

    # 2 CPU ranks (or every local GPU), the embedded default corpus:
    deepspeed --num_gpus 2 --module smoe_ds.train --config ds_configs/cpu_tiny.json
    torchrun --nproc_per_node 2 -m smoe_ds.train --config ds_configs/cpu_tiny.json
    mpirun -np 2 python -m smoe_ds.train --config ds_configs/cpu_tiny.json
    # any key can be overridden:
    ... --set moe.k_schedule.kind=cosine --set train_micro_batch_size_per_gpu=4

Each optimizer step sets k from the schedule (a pure function of the step), runs the
micro-batches of one step through the engine, and steps. Rank 0 shows a progress bar and
writes loss, k, lr and per-expert load through DeepSpeed's monitor. Training ends with the
self-slimming table: validation loss and bits per byte at k = 1, 2, 4, ..., N.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from smoe_ds import checkpoint, faults, memory, placement
from smoe_ds import distributed as D
from smoe_ds.cli import run_main
from smoe_ds.config import TrainConfig, config_cli
from smoe_ds.data import train_batches
from smoe_ds.heap import HeapTrimmer
from smoe_ds.loop import (
    LossWindow,
    MicroBatchLoss,
    TrainClock,
    optimizer_step,
    progress_bar,
    write_run_config,
    write_summary,
)
from smoe_ds.models.lm import count_parameters
from smoe_ds.moe.dispatch import exchange_elements, same_tokens_on_every_rank
from smoe_ds.moe.layer import moe_layers, set_active_experts
from smoe_ds.moe.schedule import active_k
from smoe_ds.moe.thor import thor_loss
from smoe_ds.numerics import BadLossGuard
from smoe_ds.results import LN2, report, validation_loss
from smoe_ds.runtime import Runtime, build_runtime
from smoe_ds.step_breakdown import StepBreakdown, format_table


def expert_load_events(model: torch.nn.Module, step: int) -> list[tuple]:
    """Share of routed tokens per expert, summed over ranks, for the last forward of each layer."""
    events = []
    for layer_idx, layer in enumerate(moe_layers(model)):
        counts = D.all_reduce_sum(layer.deepspeed_moe.exp_counts.double())
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


def micro_batch_loss(rt: Runtime) -> MicroBatchLoss:
    """The trainer's loss of one micro-batch (x, y: [micro_batch, block_size] token ids): the loss to
    backpropagate (THOR's adds a second pass with fresh random routes) and the LM loss to log."""
    engine, moe = rt.engine, rt.cfg.moe

    def loss_of(batch):
        x, y = batch
        x, y = x.to(engine.device), y.to(engine.device)
        with same_tokens_on_every_rank():  # every rank's micro-batch is [micro_batch, block_size]
            out = engine(x, y)
            loss = out.loss
            if moe.mode == "thor":  # a second pass with fresh random routes, and their consistency
                loss = thor_loss(out, engine(x, y), moe.thor_alpha)
        return loss, out.lm_loss

    return loss_of


def periodic_validation(rt: Runtime, val: list, k: int, step: int, bar, clock: TrainClock) -> dict:
    """Validation loss at the current k and at k = N; logged, shown, and k restored afterwards.
    The entry carries the run's training time so far, for time-to-quality comparisons."""
    cfg, engine = rt.cfg, rt.engine
    ks = sorted({k, cfg.moe.num_experts}) if cfg.slimmable else [k]
    losses = {f"k={kk}": validation_loss(engine, val, kk) for kk in ks}
    set_active_experts(engine.module, k)
    engine.monitor.write_events([(f"Eval/loss_{name}", v, step) for name, v in losses.items()])
    if D.is_main():
        bar.write(f"step {step}: validation loss " + ", ".join(f"{v:.4f} at {name}" for name, v in losses.items()))
    return {"step": step, "train_wall_s": clock.elapsed_s(), **losses}


def describe(rt: Runtime) -> str:
    cfg = rt.cfg
    n, ep = cfg.moe.num_experts, cfg.moe.ep_size
    params = count_parameters(rt.model, ep if cfg.uses_moe else 1)
    moe_at = cfg.model.moe_layer_indices() if cfg.uses_moe else "none (dense)"
    zero = cfg.deepspeed.get("zero_optimization", {})
    # The optimizer DeepSpeed actually built (FusedAdam, torch's AdamW, DeepSpeedCPUAdam, ...), so
    # a run shows whether e.g. optimizer offload is in effect.
    basic = getattr(rt.engine, "basic_optimizer", None)
    optimizer = type(basic).__name__ if basic is not None else "no optimizer"
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    optimizer += " (optimizer state offloaded to the CPU)" if offloaded else ""
    lines = [
        f"smoe-ds: {cfg.moe.mode}, {cfg.model.n_layers} layers x d_model {cfg.model.d_model}, "
        f"{n} experts x {cfg.moe.d_expert} in layers {moe_at}, {params / 1e6:.2f}M parameters",
        f"  world size {rt.world_size}, ep_size {ep}: rank r holds experts [(r % {ep}) * {n // ep}, +{n // ep}); "
        f"ZeRO stage {zero.get('stage', 0)}, {optimizer}",
        f"  data: {rt.corpus.description}",
    ]
    if cfg.moe.mode == "smoe_dropout":
        ks = cfg.moe.k_schedule
        lines.append(f"  k schedule: {ks.kind} {ks.k_min} -> {ks.k_max} over steps {ks.start_step}..{ks.end_step}")
    elif cfg.uses_moe:
        lines.append(f"  fixed k = {cfg.fixed_k()}")
    if cfg.uses_moe and cfg.moe.mode != "learned" and ep > 1:
        lines.append(describe_exchange(cfg, rt.micro_batch * cfg.model.block_size))
    return "\n".join(lines)


def describe_exchange(cfg: TrainConfig, tokens_per_rank: int) -> str:
    """What expert parallelism moves per MoE layer and micro-batch (forward and backward, one
    rank's share, at the largest k the run reaches), with a warning where the other exchange
    would move fewer bytes (``smoe_ds.moe.dispatch.exchange_elements``)."""
    m = cfg.moe
    k = m.k_schedule.k_max if m.mode == "smoe_dropout" else cfg.fixed_k()
    elem = 2 if cfg.precision_enabled("bf16") or cfg.precision_enabled("fp16") else 4
    elements = exchange_elements(tokens_per_rank, cfg.model.d_model, m.num_experts, m.d_expert, m.ep_size, k)
    mb = {name: n * elem / 2**20 for name, n in elements.items()}
    other = "tokens" if m.ep_exchange == "weights" else "weights"
    line = (
        f"  expert parallelism moves the {m.ep_exchange} (moe.ep_exchange): {mb[m.ep_exchange]:.1f} MiB per layer"
        f" and micro-batch from each rank at k = {k}; the {other} would be {mb[other]:.1f} MiB"
    )
    if mb[other] < mb[m.ep_exchange]:
        line += f"\n  warning: moe.ep_exchange={other} would move fewer bytes here (docs/ep_communication.md)"
    return line


def tokens_per_step(rt: Runtime) -> int:
    """Tokens one optimizer step trains on, over all ranks."""
    return rt.micro_batch * rt.engine.gradient_accumulation_steps() * rt.world_size * rt.cfg.model.block_size


def open_run_folder(rt: Runtime, out_dir: Path) -> None:
    """Rank 0 writes config.json, prints the run and its expert placement, and writes the placement.
    Every rank calls this (the placement is gathered from all of them)."""
    cfg = rt.cfg
    layout = placement.gather_layout(cfg.moe.ep_size, cfg.moe.num_experts) if cfg.uses_moe else None
    if D.is_main():
        write_run_config(out_dir, cfg)
        print(describe(rt), flush=True)
        if layout:
            print(placement.describe(layout), flush=True)
            placement.write(layout, out_dir)


def resume(rt: Runtime, ckpt_dir: Path) -> tuple[int, dict]:
    """The step to start from and the trainer state saved with it: (0, {}) unless run.resume finds a checkpoint."""
    start_step, saved = checkpoint.restore(rt.engine, rt.cfg, ckpt_dir) if rt.cfg.run.resume else (0, {})
    if start_step and D.is_main():
        print(f"resumed from {ckpt_dir / f'step{start_step}'}", flush=True)
    return start_step, saved


def log_line(rt: Runtime, guard: BadLossGuard, bar, done: int, k: int, loss: float, tok_s: float) -> dict:
    """Write step ``done``'s monitor events and progress-bar figures; returns its history entry.
    Every rank calls this (the expert loads and dropped routes are summed over ranks)."""
    engine = rt.engine
    lr = engine.get_lr()[0]
    events = [("Train/loss", loss, done), ("Train/k", k, done), ("Train/lr", lr, done)]
    events += expert_load_events(engine.module, done)
    skipped = engine.skipped_steps if not guard.enabled else guard.skipped  # fp16: the loss scaler's
    if skipped:
        events.append(("Train/skipped_steps", skipped, done))
    drop = dropped_fraction(engine.module)
    postfix = {"loss": f"{loss:.3f}", "k": k, "tok/s": f"{tok_s:,.0f}"}
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
        "tokens_per_s": tok_s,
        "skipped_steps": skipped,
        "load_avg_1m": load,
    }


def train_steps(
    rt: Runtime, ckpt_dir: Path, start_step: int, saved: dict
) -> tuple[list, list, TrainClock, StepBreakdown]:
    """Steps start_step..run.max_steps with their log lines, validations and saves, then the final save.

    Returns the log history, the validation history, the run's training clock (the steps of
    every sitting, without validations and saves) and the step breakdown (off unless
    ``run.step_breakdown``).
    """
    cfg, engine, run = rt.cfg, rt.engine, rt.cfg.run
    gas = engine.gradient_accumulation_steps()
    # Micro-batches skipped for NaN/inf losses were read too: the data resumes after them.
    skipped_before = saved.get("skipped_micro_batches", 0)
    batches = train_batches(
        rt.corpus.train_blocks, rt.micro_batch, rt.rank, rt.world_size, cfg.data.seed, gas, start_step, skipped_before
    )
    val = rt.val_batches(run.eval_batches)
    step_tokens = tokens_per_step(rt)
    bar = progress_bar("train", run.max_steps, initial=start_step)
    heap = HeapTrimmer(run.heap_trim_interval, engine.device)  # CPU runs: smoe_ds.heap
    clock = TrainClock.resumed(saved)
    with clock.paused():
        val_history = (
            [periodic_validation(rt, val, active_k(cfg, start_step), start_step, bar, clock)]
            if run.eval_interval
            else []
        )
    history = []
    window = LossWindow.resumed(saved)
    guard = BadLossGuard(run.max_bad_steps, enabled=not cfg.precision_enabled("fp16"))  # fp16: the loss scaler's job
    guard.skipped = skipped_before
    loss_of = micro_batch_loss(rt)
    # The first steps (a fifth of them, at most 10) warm up before the breakdown counts.
    breakdown = StepBreakdown(run.step_breakdown, warmup_steps=min(10, (run.max_steps - start_step) // 5))

    def save(step: int) -> None:
        with clock.paused():  # collective: every rank calls it
            state = {"skipped_micro_batches": guard.skipped, **window.state(), **clock.state()}
            checkpoint.save(engine, cfg, ckpt_dir, step, run.keep_last, trainer_state=state)

    def last_checkpoint() -> str | None:  # named when too many micro-batches in a row are bad
        return checkpoint.latest_path(ckpt_dir)

    for step in range(start_step, run.max_steps):
        k = active_k(cfg, step)
        set_active_experts(engine.module, k)
        faults.maybe_die("train", rt.rank, step)
        step_loss = optimizer_step(engine, batches, loss_of, guard, step, rt.rank, last_checkpoint, breakdown)
        window.add(step_loss, gas * rt.world_size)
        done = step + 1
        bar.update(1)
        if done % run.log_interval == 0 or done == run.max_steps:
            loss = window.mean_and_reset()
            tok_s = (done - start_step) * step_tokens / clock.sitting_s()
            history.append(log_line(rt, guard, bar, done, k, loss, tok_s))
        if run.eval_interval and (done % run.eval_interval == 0 or done == run.max_steps):
            with clock.paused():
                val_history.append(periodic_validation(rt, val, active_k(cfg, done), done, bar, clock))
        if run.save_checkpoint and run.save_interval and done % run.save_interval == 0 and done < run.max_steps:
            save(done)
        heap.step_done(done)
        breakdown.step_done(clock.elapsed_s())
    bar.close()
    if run.save_checkpoint and start_step < run.max_steps:
        save(run.max_steps)
    return history, val_history, clock, breakdown


def final_sweep(rt: Runtime, wall: float) -> list[dict]:
    """The self-slimming rows (smoe_ds.results.report) on run.final_eval_batches; rank 0 prints and writes them."""
    cfg, run = rt.cfg, rt.cfg.run
    return report(
        rt.engine,
        rt.val_batches(run.final_eval_batches),
        run.eval_ks,
        rt.corpus.bytes_per_token,
        run.out_dir,
        {
            "title": f"self-slimming: {cfg.moe.mode}, {run.max_steps} steps",
            "mode": cfg.moe.mode,
            "steps": run.max_steps,
            "train_wall_s": wall,
            "num_experts": cfg.moe.num_experts,
        },
    )


def closing_line(summary: dict, max_steps: int) -> str:
    """The run's last line: steps, time, throughput and the first and last logged training loss."""
    history = summary["history"]
    first, last = (history[0]["loss"], history[-1]["loss"]) if history else (math.nan, math.nan)
    return (
        f"trained steps {summary['resumed_from_step']}..{max_steps} ({summary['tokens_per_s']:,.0f} tokens/s), "
        f"{summary['train_wall_s']:.1f}s of training in all; "
        f"train loss {first:.3f} -> {last:.3f} ({last / LN2:.3f} bits/token)"
    )


def train(cfg: TrainConfig) -> dict:
    rt = build_runtime(cfg, training=True)  # every input check runs in here, before out_dir is created
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    open_run_folder(rt, out_dir)
    start_step, saved = resume(rt, ckpt_dir)
    history, val_history, clock, breakdown = train_steps(rt, ckpt_dir, start_step, saved)
    wall = clock.elapsed_s()
    step_breakdown = breakdown.summary()  # collective
    rows = final_sweep(rt, wall)
    summary = {
        "train_wall_s": wall,  # every sitting's steps, without validations and saves
        "tokens_per_s": (cfg.run.max_steps - start_step) * tokens_per_step(rt) / max(clock.sitting_s(), 1e-9),
        "resumed_from_step": start_step,
        "history": history,
        "val_history": val_history,
        "self_slimming": rows,
        "memory_per_rank": memory.per_rank(rt.engine),
    }
    if step_breakdown:
        summary["step_breakdown"] = step_breakdown
    if D.is_main():
        if step_breakdown:
            print(f"step breakdown, mean over ranks of {step_breakdown['measured_steps']} steps:", flush=True)
            print(format_table({cfg.moe.mode: step_breakdown}), flush=True)
        write_summary(out_dir, summary)
        print(closing_line(summary, cfg.run.max_steps), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    load = config_cli(argv, "smoe-train", __doc__.split("\n\n")[0])
    return run_main(lambda: train(load()))


if __name__ == "__main__":
    sys.exit(main())
