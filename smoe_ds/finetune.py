"""Fine-tune a pretrained Hugging Face model with SMoE-Dropout under DeepSpeed expert parallelism.

    deepspeed --num_gpus 2 --module smoe_ds.finetune --config ds_configs/finetune_minilm_sst2.json \\
        --set hf.model=DIR --set data.path=train.tsv --set data.validation=dev.tsv
    # the dense baseline with the same budget:
    ... --set moe.mode=dense --set run.out_dir=runs/sst2-dense

The model's FFNs are split into moe.num_experts experts behind frozen random routers
(``smoe_ds.hf.surgery``; hf.weighting ``rescale`` starts from exactly the pretrained function),
each rank keeping its N / ep_size experts; k follows moe.k_schedule. The steps run in the
trainer's own loop (``smoe_ds.training.loop``): checkpoints in ``OUT/checkpoints`` every
run.save_interval steps and at the end, and a relaunch resumes from the newest one exactly (at
the layout it was saved at) unless run.resume is false. At the end every rank
evaluates at each k in run.eval_ks (accuracy for classification, loss and perplexity for
causal LM), rank 0 prints the self-slimming table and writes ``self_slimming.json`` and
``.png``, and ``OUT/model`` receives the whole model (experts gathered from all ranks) as a
Hugging Face directory with its tokenizer: ``from_pretrained`` after ``import smoe_ds`` loads
it at any k, and ``python -m smoe_ds.hf_convert OUT/model DENSE --densify`` writes a plain one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from smoe_ds.cli import run_main
from smoe_ds.config.schema import config_cli
from smoe_ds.data import train_steps_per_epoch
from smoe_ds.distributed import process_group as D
from smoe_ds.distributed import watchdog, zero3
from smoe_ds.finetuning import from_smoe_export
from smoe_ds.finetuning.config import FinetuneConfig
from smoe_ds.finetuning.from_smoe_export import is_smoe_lm_export
from smoe_ds.finetuning.mwp_task import MathWordProblemTask
from smoe_ds.finetuning.tasks import TASK_CLASSES, Task
from smoe_ds.hf.surgery import dense_config
from smoe_ds.moe.layer import set_ep_exchange
from smoe_ds.moe.parallel import ep_rank_of
from smoe_ds.moe.thor import training_loss
from smoe_ds.training import preflight
from smoe_ds.training.loop import Evaluation, Job, report_breakdown, run_steps
from smoe_ds.training.loop_helpers import write_run_config, write_summary
from smoe_ds.training.runtime import initialize_engine
from smoe_ds.training.self_slimming import format_rows, write_results

TASKS = {**TASK_CLASSES, "math_word_problem": MathWordProblemTask}


def quiet_libraries(rank: int) -> None:
    """No per-row progress bars from datasets; transformers' load report (e.g. a new classifier
    head) printed by rank 0 only, not once per rank."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if rank != 0:
        hf_logging.set_verbosity_error()


def load_pretrained_for_task(cfg: FinetuneConfig, task, ep_rank: int):
    """The pretrained model with the task's head, converted (this rank's experts) unless moe.mode is dense."""
    from smoe_ds.hf.conversion import convert_model

    torch.manual_seed(cfg.run.seed)  # a new head (e.g. the classifier) starts the same on every rank
    if is_smoe_lm_export(cfg.hf.model):  # pretrained here: already experts (or dense), nothing to convert
        # ZeRO-3 takes the plain layers (its engine refuses DeepSpeed MoE ones; smoe_ds.distributed.zero3)
        return task.load_smoe_export(cfg.hf.model, cfg.moe.ep_size, ep_rank, for_deepspeed=cfg.zero_stage != 3)
    model = task.load_model(cfg.hf.model)
    if cfg.uses_moe:
        m = cfg.moe
        # ZeRO-3 takes the plain layers (its engine refuses DeepSpeed MoE ones; smoe_ds.distributed.zero3)
        zero3_plain = cfg.zero_stage == 3
        convert_model(
            task.hf_part(model),
            m.num_experts,
            cfg.hf.weighting,
            m.router_seed,
            m.ep_size,
            ep_rank,
            for_deepspeed=not zero3_plain,
        )
    return model


def model_name(path: str) -> str:
    """A short name for titles: a hub name as it is, a local folder by its last two parts."""
    p = Path(path)
    return "/".join(p.parts[-2:]) if p.exists() else path


def export(engine, cfg: FinetuneConfig, task, out: Path) -> Path | None:
    """Every rank calls this; rank 0 writes the whole model, at k = N, to ``out`` (returned)."""
    from smoe_ds.hf.gather import single_device_copy
    from smoe_ds.hf.save import save_smoe

    hf_model = task.hf_part(engine.module)
    with zero3.gathered_module(engine.module):  # ZeRO-3: every weight whole for the copy (else a no-op)
        if is_smoe_lm_export(cfg.hf.model):
            model = from_smoe_export.single_device_copy(hf_model, cfg.expert_parallel_size, cfg.moe.export_k())
            if model is not None:
                model.save_pretrained(out)
        elif cfg.uses_moe:
            model = single_device_copy(hf_model, cfg.moe.ep_size, cfg.moe.num_experts)
            if model is not None:
                save_smoe(model, out)
        elif D.is_main():
            hf_model.save_pretrained(out)
        if D.is_main():
            task.save_extra(engine.module, out)
    if not D.is_main():
        return None
    task.tokenizer.save_pretrained(out)
    return out


def check_inputs(cfg: FinetuneConfig) -> tuple[int, int, Task]:
    """Join the process group and check the config, model and data before anything heavy or written.

    Returns (rank, world size, the task with its data loaded).
    """
    D.init_distributed(cfg.run.master_port, cfg.run.collective_timeout_s)
    rank, world = D.rank(), D.world_size()
    quiet_libraries(rank)
    cfg.validate_for_world(world)
    preflight.check_out_dir(cfg.run.out_dir)
    preflight.check_precision(cfg)
    if from_smoe_export.is_checkpoint(cfg.hf.model):  # smoe_ds.train's checkpoint: its export, made once
        cfg.hf.model = str(from_smoe_export.export_checkpoint(cfg.hf.model, Path(cfg.run.out_dir) / "pretrained"))
    if is_smoe_lm_export(cfg.hf.model):
        # causal LM feeds blocks of hf.max_length + 1 tokens (the model shifts the labels itself)
        tokens = cfg.hf.max_length + (cfg.hf.task == "causal_lm")
        from_smoe_export.check_export(cfg.hf.model, cfg.moe, tokens)
    else:
        cfg.check_mode_for_hf_model()
        dense_config(cfg.hf.model, convertible=cfg.uses_moe)  # a wrong model path or architecture fails before the data
    micro, gas = cfg.micro_batch_size(world), cfg.grad_accum_steps(world)
    task = TASKS[cfg.hf.task](cfg, world, micro)
    train_steps_per_epoch(len(task.train), micro, world, gas)  # one step's worth of data, or a ConfigError now
    preflight.check_checkpoint_to_resume(cfg)  # a checkpoint to resume from fits this run
    return rank, world, task


def describe(cfg: FinetuneConfig, model, task: Task, world: int) -> str:
    """The run in two lines: model, task, mode and experts; parameters, world size and data."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3's full size
    return (
        f"smoe-ds finetune: {cfg.hf.model} ({type(model).__name__}), {cfg.hf.task}, mode {cfg.moe.mode}"
        + (
            f", N = {cfg.moe.num_experts} experts, ep_size {cfg.moe.ep_size}, {cfg.hf.weighting}"
            if cfg.uses_moe
            else ""
        )
        + f"\n  {params / 1e6:.2f}M parameters on rank 0; world size {world}; data: {task.description}"
    )


def job_of(engine, cfg: FinetuneConfig, task: Task, rank: int, world: int) -> Job:
    """The fine-tuner's part of the shared loop (``smoe_ds.training.loop``): the task's batches in
    the global order, the model's own loss (THOR's two passes as the trainer has them), and the
    task's metric as the periodic evaluation."""
    gas, micro = cfg.grad_accum_steps(world), cfg.micro_batch_size(world)

    def micro_batches(start_step: int, skipped: int):
        return task.train_batches(rank, gas, start_step, skipped)

    def loss_of(batch: dict):  # the task's tensors by name -> (the loss to backpropagate, the loss to log)
        inputs = {key: t.to(engine.device) for key, t in batch.items()}
        loss, out = training_loss(lambda: engine(**inputs), cfg.moe.mode, cfg.moe.thor_alpha)
        return loss, out.loss

    def evaluate(k: int) -> Evaluation:
        row = task.evaluate(engine, k, rank)
        value = row[task.metric]
        return Evaluation(row, [(f"Eval/{task.metric}_k={k}", value)], f"{task.metric} {value:.4f} at k={k}")

    causal = cfg.hf.task == "causal_lm"  # fixed-size blocks: count tokens; else examples of any length
    per_step = micro * gas * world * (cfg.hf.max_length if causal else 1)
    return Job(
        engine,
        cfg,
        rank,
        world,
        micro_batches,
        loss_of,
        evaluate,
        items_per_step=per_step,
        item_name="tokens" if causal else "examples",
        evaluate_at_ends=False,  # the final self-slimming sweep evaluates at every k right after
        name="finetune",
    )


def write_report(cfg: FinetuneConfig, task: Task, summary: dict, out_dir: Path, exported: Path | None) -> None:
    """Rank 0: print the self-slimming table, write its JSON and plot and train_summary.json."""
    run, rows, wall = cfg.run, summary["self_slimming"], summary["train_wall_s"]
    title = f"self-slimming: {cfg.moe.mode} fine-tune of {model_name(cfg.hf.model)}, {run.max_steps} steps"
    print("\n" + format_rows(rows, title), flush=True)
    meta = {"title": title, "mode": cfg.moe.mode, "task": cfg.hf.task, "steps": run.max_steps, "train_wall_s": wall}
    json_path, png_path = write_results(rows, out_dir, meta, metric=task.metric, ylabel=task.metric_label)
    write_summary(out_dir, summary)
    print(f"trained {run.max_steps} steps in {wall:.1f}s; wrote {json_path}, {png_path} and {exported}", flush=True)


def finetune(cfg: FinetuneConfig) -> dict:
    rank, world, task = check_inputs(cfg)
    watchdog.start(cfg.run.heartbeat_interval_s, cfg.run.dead_rank_timeout_s)
    model = load_pretrained_for_task(cfg, task, ep_rank=ep_rank_of(rank, cfg.moe.ep_size))
    set_ep_exchange(model, cfg.moe.ep_exchange)
    new = task.new_weights(model)
    engine = initialize_engine(model, cfg, lr_of={id(p): cfg.hf.new_weights_lr for p in new if cfg.hf.new_weights_lr})
    out_dir = Path(cfg.run.out_dir)
    if D.is_main():
        write_run_config(out_dir, cfg)
        print(describe(cfg, model, task, world), flush=True)
    job = job_of(engine, cfg, task, rank, world)
    result = run_steps(job)
    step_breakdown = report_breakdown(result, cfg.moe.mode)  # collective
    rows = [task.evaluate(engine, kk, rank) for kk in cfg.run.eval_ks]
    if D.is_main():
        task.write_predictions(out_dir)
    exported = export(engine, cfg, task, out_dir / "model")
    summary = {
        "train_wall_s": result.train_wall_s,  # every sitting's steps, without evaluations and saves
        f"{job.item_name}_per_s": result.throughput(job),
        "resumed_from_step": result.start_step,
        "history": result.history,  # every sitting's
        "val_history": result.val_history,
        "self_slimming": rows,
    }
    if step_breakdown:
        summary["step_breakdown"] = step_breakdown
    if D.is_main():
        write_report(cfg, task, summary, out_dir, exported)
    return summary


def main(argv: list[str] | None = None) -> int:
    load = config_cli(argv, "smoe-finetune", __doc__.split("\n\n")[0], cls=FinetuneConfig)
    return run_main(lambda: finetune(load()))


if __name__ == "__main__":
    sys.exit(main())
