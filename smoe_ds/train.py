"""Train an SMoE-Dropout language model with DeepSpeed expert parallelism and ZeRO.

    # 2 CPU ranks (or every local GPU), the embedded default corpus:
    deepspeed --num_gpus 2 --module smoe_ds.train --config ds_configs/cpu_tiny.json
    torchrun --nproc_per_node 2 -m smoe_ds.train --config ds_configs/cpu_tiny.json
    mpirun -np 2 python -m smoe_ds.train --config ds_configs/cpu_tiny.json
    # any key can be overridden:
    ... --set moe.k_schedule.kind=cosine --set train_micro_batch_size_per_gpu=4

Each optimizer step sets k from the schedule (a pure function of the step), runs the
micro-batches of one step through the engine, and steps (the loop is ``smoe_ds.training.loop``,
shared with the fine-tuner). Rank 0 shows a progress bar and writes loss, k, lr and per-expert
load through DeepSpeed's monitor. Training ends with the self-slimming table: validation loss
and bits per byte at k = 1, 2, 4, ..., N (an encoder, ``model.objective`` masked_lm: loss and
accuracy on the masked tokens, docs/encoder.md).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

from smoe_ds.cli import run_main
from smoe_ds.config.schema import TrainConfig, config_cli
from smoe_ds.data import train_batches
from smoe_ds.distributed import memory, placement
from smoe_ds.distributed import process_group as D
from smoe_ds.masking import masked_train_batches
from smoe_ds.models.lm import count_parameters
from smoe_ds.moe.dispatch import exchange_elements, same_tokens_on_every_rank
from smoe_ds.moe.thor import training_loss
from smoe_ds.training.loop import Evaluation, Job, report_breakdown, run_steps
from smoe_ds.training.loop_helpers import MicroBatchLoss, write_run_config, write_summary
from smoe_ds.training.runtime import Runtime, build_runtime
from smoe_ds.training.self_slimming import LN2, masked_lm_metrics, report, validation_loss


def micro_batch_loss(rt: Runtime) -> MicroBatchLoss:
    """The trainer's loss of one micro-batch (x, y: [micro_batch, block_size] token ids): the loss to
    backpropagate (THOR's adds a second pass with fresh random routes) and the LM loss to log."""
    engine, moe = rt.engine, rt.cfg.moe

    def loss_of(batch):
        x, y = batch
        x, y = x.to(engine.device), y.to(engine.device)
        with same_tokens_on_every_rank():  # every rank's micro-batch is [micro_batch, block_size]
            loss, out = training_loss(lambda: engine(x, y), moe.mode, moe.thor_alpha)
        return loss, out.lm_loss

    return loss_of


def validation(rt: Runtime) -> Callable[[int], Evaluation]:
    """The trainer's periodic evaluation: validation loss on run.eval_batches per rank at the current
    k and, for the modes that can slim, at k = N."""
    cfg, engine = rt.cfg, rt.engine
    val = rt.val_batches(cfg.run.eval_batches)

    def loss_at(k: int) -> float:  # the encoder's is over the masked tokens
        return masked_lm_metrics(engine, val, k)["loss"] if rt.masking else validation_loss(engine, val, k)

    def evaluate(k: int) -> Evaluation:
        ks = sorted({k, cfg.moe.num_experts}) if cfg.slimmable else [k]
        losses = {f"k={kk}": loss_at(kk) for kk in ks}
        return Evaluation(
            losses,
            [(f"Eval/loss_{name}", v) for name, v in losses.items()],
            "validation loss " + ", ".join(f"{v:.4f} at {name}" for name, v in losses.items()),
        )

    return evaluate


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
    kind = " encoder (masked LM)" if rt.masking else ""
    lines = [
        f"smoe-ds: {cfg.moe.mode}{kind}, {cfg.model.n_layers} layers x d_model {cfg.model.d_model}, "
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
        line += f"\n  warning: moe.ep_exchange={other} would move fewer bytes here (docs/expert_parallelism.md)"
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


def job_of(rt: Runtime) -> Job:
    """The trainer's part of the shared loop (``smoe_ds.training.loop``): the corpus's blocks in the
    global order (masked for the encoder, ``smoe_ds.masking``), the LM loss, the validation loss, and
    tokens as the unit of throughput."""
    cfg = rt.cfg

    def micro_batches(start_step: int, skipped: int):
        gas = rt.engine.gradient_accumulation_steps()
        blocks, order = rt.corpus.train_blocks, (rt.micro_batch, rt.rank, rt.world_size, cfg.data.seed, gas)
        if rt.masking:
            return masked_train_batches(blocks, rt.masking, *order, start_step, skipped)
        return train_batches(blocks, *order, start_step, skipped)

    return Job(
        rt.engine,
        cfg,
        rt.rank,
        rt.world_size,
        micro_batches,
        micro_batch_loss(rt),
        validation(rt),
        items_per_step=tokens_per_step(rt),
    )


def final_sweep(rt: Runtime, wall: float) -> list[dict]:
    """The self-slimming rows (``self_slimming.report``) on run.final_eval_batches; rank 0 prints and
    writes them."""
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
            "objective": cfg.model.objective,
        },
        masked=rt.masking is not None,
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
    open_run_folder(rt, out_dir)
    job = job_of(rt)
    result = run_steps(job)
    wall = result.train_wall_s
    step_breakdown = report_breakdown(result, cfg.moe.mode)  # collective
    rows = final_sweep(rt, wall)
    summary = {
        "train_wall_s": wall,  # every sitting's steps, without validations and saves
        "tokens_per_s": result.throughput(job),
        "resumed_from_step": result.start_step,
        "history": result.history,  # every sitting's
        "val_history": result.val_history,
        "self_slimming": rows,
        "memory_per_rank": memory.per_rank(rt.engine),
    }
    if step_breakdown:
        summary["step_breakdown"] = step_breakdown
    if D.is_main():
        write_summary(out_dir, summary)
        print(closing_line(summary, cfg.run.max_steps), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    load = config_cli(argv, "smoe-train", __doc__.split("\n\n")[0])
    return run_main(lambda: train(load()))


if __name__ == "__main__":
    sys.exit(main())
