"""Train an SMoE-Dropout language model with DeepSpeed expert parallelism and ZeRO.

    # 2 CPU ranks (or every local GPU), the embedded default corpus:
    deepspeed --num_gpus 2 -m smoe_ds.train --config ds_configs/cpu_tiny.json
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

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from smoe_ds import checkpoint, faults, placement
from smoe_ds import distributed as D
from smoe_ds.cli import run_main
from smoe_ds.config import TrainConfig, config_cli
from smoe_ds.data import train_batches
from smoe_ds.models.lm import count_parameters
from smoe_ds.moe.layer import moe_layers, set_active_experts
from smoe_ds.moe.schedule import active_k
from smoe_ds.moe.thor import thor_loss
from smoe_ds.numerics import BadLossGuard
from smoe_ds.results import LN2, report, validation_loss
from smoe_ds.runtime import Runtime, build_runtime


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


def train_step(rt: Runtime, batches, step: int, guard: BadLossGuard, ckpt_dir: Path) -> torch.Tensor:
    """One optimizer step of gradient_accumulation_steps good micro-batches; returns their summed LM loss.

    A micro-batch whose loss is NaN/inf on any rank is skipped everywhere before backward and
    replaced by the next one (see smoe_ds.numerics), so no bad gradient reaches the weights.
    """
    engine, total, good = rt.engine, torch.zeros(()), 0
    while good < engine.gradient_accumulation_steps():
        x, y = next(batches)
        x, y = x.to(engine.device), y.to(engine.device)
        out = engine(x, y)
        loss = out.loss
        if rt.cfg.moe.mode == "thor":  # a second pass with fresh random routes, and their consistency
            loss = thor_loss(out, engine(x, y), rt.cfg.moe.thor_alpha)
        if faults.poisoned("train", rt.rank, step):
            loss = loss * float("nan")
        bad = guard.bad_ranks(loss)
        if bad:
            guard.record_bad(step, bad, checkpoint.latest_path(ckpt_dir))
            continue
        engine.backward(loss)
        engine.step()
        total += out.lm_loss.detach().float().cpu()
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


def periodic_validation(rt: Runtime, val: list, k: int, step: int, bar) -> dict:
    """Validation loss at the current k and at k = N; logged, shown, and k restored afterwards."""
    cfg, engine = rt.cfg, rt.engine
    ks = sorted({k, cfg.moe.num_experts}) if cfg.slimmable else [k]
    losses = {f"k={kk}": validation_loss(engine, val, kk) for kk in ks}
    set_active_experts(engine.module, k)
    engine.monitor.write_events([(f"Eval/loss_{name}", v, step) for name, v in losses.items()])
    if D.is_main():
        bar.write(f"step {step}: validation loss " + ", ".join(f"{v:.4f} at {name}" for name, v in losses.items()))
    return {"step": step, **losses}


def describe(rt: Runtime) -> str:
    cfg = rt.cfg
    n, ep = cfg.moe.num_experts, cfg.moe.ep_size
    params = count_parameters(rt.model, ep if cfg.uses_moe else 1)
    moe_at = cfg.model.moe_layer_indices() if cfg.uses_moe else "none (dense)"
    stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    lines = [
        f"smoe-ds: {cfg.moe.mode}, {cfg.model.n_layers} layers x d_model {cfg.model.d_model}, "
        f"{n} experts x {cfg.moe.d_expert} in layers {moe_at}, {params / 1e6:.2f}M parameters",
        f"  world size {rt.world_size}, ep_size {ep}: rank r holds experts [(r % {ep}) * {n // ep}, +{n // ep}); "
        f"ZeRO stage {stage}",
        f"  data: {rt.corpus.description}",
    ]
    if cfg.moe.mode == "smoe_dropout":
        ks = cfg.moe.k_schedule
        lines.append(f"  k schedule: {ks.kind} {ks.k_min} -> {ks.k_max} over steps {ks.start_step}..{ks.end_step}")
    elif cfg.uses_moe:
        lines.append(f"  fixed k = {cfg.fixed_k()}")
    return "\n".join(lines)


def train(cfg: TrainConfig) -> dict:
    rt = build_runtime(cfg, training=True)  # every input check runs in here, before out_dir is created
    engine, run = rt.engine, cfg.run
    out_dir = Path(run.out_dir)
    layout = placement.gather_layout(cfg.moe.ep_size, cfg.moe.num_experts) if cfg.uses_moe else None
    if D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        print(describe(rt), flush=True)
        if layout:
            print(placement.describe(layout), flush=True)
            placement.write(layout, out_dir)
    ckpt_dir = out_dir / "checkpoints"
    start_step, saved = checkpoint.restore(engine, cfg, ckpt_dir) if run.resume else (0, {})
    if start_step and D.is_main():
        print(f"resumed from {ckpt_dir / f'step{start_step}'}", flush=True)
    gas = engine.gradient_accumulation_steps()
    # Micro-batches skipped for NaN/inf losses were read too: the data resumes after them.
    skipped_before = saved.get("skipped_micro_batches", 0)
    batches = train_batches(
        rt.corpus.train_blocks, rt.micro_batch, rt.rank, rt.world_size, cfg.data.seed, gas, start_step, skipped_before
    )
    val = rt.val_batches(run.eval_batches)
    n = cfg.moe.num_experts
    tokens_per_step = rt.micro_batch * gas * rt.world_size * cfg.model.block_size
    # A log file (no terminal) gets a line every 10 s instead of a redraw per step.
    bar = tqdm(
        total=run.max_steps,
        initial=start_step,
        disable=not D.is_main(),
        desc="train",
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=0.5 if sys.stdout.isatty() else 10.0,
    )
    val_history = (
        [periodic_validation(rt, val, active_k(cfg, start_step), start_step, bar)] if run.eval_interval else []
    )
    history, t0 = [], time.perf_counter()
    window = LossWindow.resumed(saved)
    guard = BadLossGuard(run.max_bad_steps, enabled=not cfg.precision_enabled("fp16"))  # fp16: the loss scaler's job
    guard.skipped = skipped_before

    def save(step: int) -> None:
        state = {"skipped_micro_batches": guard.skipped, **window.state()}  # collective: every rank calls it
        checkpoint.save(engine, cfg, ckpt_dir, step, run.keep_last, trainer_state=state)

    for step in range(start_step, run.max_steps):
        k = active_k(cfg, step)
        set_active_experts(engine.module, k)
        faults.maybe_die("train", rt.rank, step)
        window.add(train_step(rt, batches, step, guard, ckpt_dir), gas * rt.world_size)
        done = step + 1
        bar.update(1)

        if done % run.log_interval == 0 or done == run.max_steps:
            loss = window.mean_and_reset()
            tok_s = (done - start_step) * tokens_per_step / (time.perf_counter() - t0)
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
            history.append(
                {"step": done, "loss": loss, "k": k, "lr": lr, "tokens_per_s": tok_s, "skipped_steps": skipped}
            )

        if run.eval_interval and (done % run.eval_interval == 0 or done == run.max_steps):
            val_history.append(periodic_validation(rt, val, active_k(cfg, done), done, bar))
        if run.save_checkpoint and run.save_interval and done % run.save_interval == 0 and done < run.max_steps:
            save(done)
    bar.close()
    wall = time.perf_counter() - t0

    if run.save_checkpoint and start_step < run.max_steps:
        save(run.max_steps)
    rows = report(
        engine,
        rt.val_batches(run.final_eval_batches),
        run.eval_ks,
        rt.corpus.bytes_per_token,
        run.out_dir,
        {
            "title": f"self-slimming: {cfg.moe.mode}, {run.max_steps} steps",
            "mode": cfg.moe.mode,
            "steps": run.max_steps,
            "train_wall_s": wall,
            "num_experts": n,
        },
    )
    summary = {
        "train_wall_s": wall,
        "tokens_per_s": (run.max_steps - start_step) * tokens_per_step / max(wall, 1e-9),
        "resumed_from_step": start_step,
        "history": history,
        "val_history": val_history,
        "self_slimming": rows,
    }
    if D.is_main():
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        first, last = (history[0]["loss"], history[-1]["loss"]) if history else (math.nan, math.nan)
        print(
            f"trained steps {start_step}..{run.max_steps} in {wall:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s); "
            f"train loss {first:.3f} -> {last:.3f} ({last / LN2:.3f} bits/token)",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    load = config_cli(argv, "smoe-train", __doc__.split("\n\n")[0])
    return run_main(lambda: train(load()))


if __name__ == "__main__":
    sys.exit(main())
