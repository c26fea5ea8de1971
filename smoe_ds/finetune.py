"""Fine-tune a pretrained Hugging Face model with SMoE-Dropout under DeepSpeed expert parallelism.

    deepspeed --num_gpus 2 -m smoe_ds.finetune --config ds_configs/finetune_minilm_sst2.json \\
        --set hf.model=DIR --set data.train=train.tsv --set data.validation=dev.tsv
    # the dense baseline with the same budget:
    ... --set moe.mode=dense --set run.out_dir=runs/sst2-dense

The model's FFNs are split into moe.num_experts experts behind frozen random routers
(``smoe_ds.hf.convert``; hf.weighting ``rescale`` starts from exactly the pretrained function),
each rank keeping its N / ep_size experts; k follows moe.k_schedule. At the end every rank
evaluates at each k in run.eval_ks (accuracy for classification, loss and perplexity for
causal LM), rank 0 prints the self-slimming table and writes ``self_slimming.json`` and
``.png``, and ``OUT/model`` receives the whole model (experts gathered from all ranks) as a
Hugging Face directory with its tokenizer: ``from_pretrained`` after ``import smoe_ds`` loads
it at any k, and ``python -m smoe_ds.hf_convert OUT/model DENSE --densify`` writes a plain one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from smoe_ds import distributed as D
from smoe_ds import faults, preflight, watchdog
from smoe_ds.cli import run_main
from smoe_ds.config import config_cli
from smoe_ds.data import train_steps_per_epoch
from smoe_ds.hf.convert import dense_config
from smoe_ds.hf.finetune_config import FinetuneConfig
from smoe_ds.hf.finetune_tasks import TASK_CLASSES
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.moe.parallel import ep_rank_of
from smoe_ds.moe.schedule import active_k
from smoe_ds.numerics import BadLossGuard
from smoe_ds.results import format_rows, write_results
from smoe_ds.runtime import initialize_engine


def quiet_libraries(rank: int) -> None:
    """No per-row progress bars from datasets; transformers' load report (e.g. a new classifier
    head) printed by rank 0 only, not once per rank."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    if rank != 0:
        hf_logging.set_verbosity_error()


def load_model(cfg: FinetuneConfig, task, ep_rank: int):
    """The pretrained model with the task's head, converted (this rank's experts) unless moe.mode is dense."""
    from smoe_ds.hf.convert import convert_model

    torch.manual_seed(cfg.run.seed)  # a new head (e.g. the classifier) starts the same on every rank
    model = task.model_class().from_pretrained(cfg.hf.model, **task.model_kwargs())
    if task.tokenizer.pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = task.tokenizer.pad_token_id  # classification heads find the last real token by it
    if cfg.uses_moe:
        m = cfg.moe
        convert_model(model, m.num_experts, cfg.hf.weighting, m.router_seed, m.ep_size, ep_rank, for_deepspeed=True)
    return model


def model_name(path: str) -> str:
    """A short name for titles: a hub name as it is, a local folder by its last two parts."""
    p = Path(path)
    return "/".join(p.parts[-2:]) if p.exists() else path


def export(engine, cfg: FinetuneConfig, task, out: Path) -> Path | None:
    """Every rank calls this; rank 0 writes the whole model, at k = N, to ``out`` (returned)."""
    from smoe_ds.hf.export import save_smoe
    from smoe_ds.hf.gather import single_device_copy

    if cfg.uses_moe:
        model = single_device_copy(engine.module, cfg.moe.ep_size, cfg.moe.num_experts)
        if model is not None:
            save_smoe(model, out)
    elif D.is_main():
        engine.module.save_pretrained(out)
    if not D.is_main():
        return None
    task.tokenizer.save_pretrained(out)
    return out


def finetune(cfg: FinetuneConfig) -> dict:

    D.init_distributed(cfg.run.master_port, cfg.run.collective_timeout_s)
    rank, world = D.rank(), D.world_size()
    quiet_libraries(rank)
    cfg.validate_for_world(world)
    preflight.check_out_dir(cfg.run.out_dir)
    preflight.check_precision(cfg)
    dense_config(
        cfg.hf.model, convertible=cfg.uses_moe
    )  # a wrong model path or architecture fails before the data loads
    micro, gas = cfg.micro_batch_size(world), cfg.grad_accum_steps(world)
    task = TASK_CLASSES[cfg.hf.task](cfg, world, micro)
    train_steps_per_epoch(len(task.train), micro, world, gas)  # one step's worth of data, or a ConfigError now

    watchdog.start(cfg.run.heartbeat_interval_s, cfg.run.dead_rank_timeout_s)
    model = load_model(cfg, task, ep_rank=ep_rank_of(rank, cfg.moe.ep_size))
    engine = initialize_engine(model, cfg)
    out_dir, run = Path(cfg.run.out_dir), cfg.run
    if D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        params = sum(p.numel() for p in model.parameters())
        print(
            f"smoe-ds finetune: {cfg.hf.model} ({type(model).__name__}), {cfg.hf.task}, mode {cfg.moe.mode}"
            + (
                f", N = {cfg.moe.num_experts} experts, ep_size {cfg.moe.ep_size}, {cfg.hf.weighting}"
                if cfg.uses_moe
                else ""
            )
            + f"\n  {params / 1e6:.2f}M parameters on rank 0; world size {world}; data: {task.description}",
            flush=True,
        )
    batches = task.train_batches(rank, gas, 0)
    bar = tqdm(
        total=run.max_steps,
        disable=not D.is_main(),
        desc="finetune",
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=0.5 if sys.stdout.isatty() else 10.0,
    )
    history, val_history, window, t0 = [], [], torch.zeros(()), time.perf_counter()
    guard = BadLossGuard(run.max_bad_steps, enabled=not cfg.precision_enabled("fp16"))  # fp16: the loss scaler's job
    for step in range(run.max_steps):
        k = active_k(cfg, step)
        set_active_experts(engine.module, k)
        faults.maybe_die("train", rank, step)
        good = 0
        while good < gas:  # a NaN/inf micro-batch is skipped on every rank and replaced (smoe_ds.numerics)
            batch = {key: t.to(engine.device) for key, t in next(batches).items()}
            loss = engine(**batch).loss
            if faults.poisoned("train", rank, step):
                loss = loss * float("nan")
            bad = guard.bad_ranks(loss)
            if bad:
                guard.record_bad(step, bad, None)
                continue
            engine.backward(loss)
            engine.step()
            window += loss.detach().float().cpu()
            good += 1
        guard.record_good()
        done = step + 1
        bar.update(1)
        if done % run.log_interval == 0 or done == run.max_steps:
            steps_in_window = done - (history[-1]["step"] if history else 0)
            mean = float(D.all_reduce_sum(window) / (steps_in_window * gas * world))
            history.append(
                {"step": done, "loss": mean, "k": k, "lr": engine.get_lr()[0], "skipped_steps": guard.skipped}
            )
            bar.set_postfix({"loss": f"{mean:.4f}", "k": k})
            window = torch.zeros(())
        if run.eval_interval and done % run.eval_interval == 0 and done < run.max_steps:
            row = task.evaluate(engine, k, rank)
            val_history.append({"step": done, **row})
            set_active_experts(engine.module, k)
            if D.is_main():
                bar.write(f"step {done}: {task.metric} {row[task.metric]:.4f} at k={k}")
    bar.close()
    wall = time.perf_counter() - t0

    rows = [task.evaluate(engine, kk, rank) for kk in run.eval_ks]
    exported = export(engine, cfg, task, out_dir / "model")
    summary = {"train_wall_s": wall, "history": history, "val_history": val_history, "self_slimming": rows}
    if D.is_main():
        title = f"self-slimming: {cfg.moe.mode} fine-tune of {model_name(cfg.hf.model)}, {run.max_steps} steps"
        print("\n" + format_rows(rows, title), flush=True)
        meta = {"title": title, "mode": cfg.moe.mode, "task": cfg.hf.task, "steps": run.max_steps, "train_wall_s": wall}
        json_path, png_path = write_results(rows, out_dir, meta, metric=task.metric, ylabel=task.metric_label)
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"trained {run.max_steps} steps in {wall:.1f}s; wrote {json_path}, {png_path} and {exported}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    load = config_cli(argv, "smoe-finetune", __doc__.split("\n\n")[0], cls=FinetuneConfig)
    return run_main(lambda: finetune(load()))


if __name__ == "__main__":
    sys.exit(main())
