"""Self-slimming evaluation: validation loss and bits per byte at k = 1, 2, 4, ..., N.

The command loads a checkpoint written by ``smoe_ds.train`` and runs the sweep the trainer
ends with (``smoe_ds.training.self_slimming``), under the same launcher:

    deepspeed --num_gpus 2 --module smoe_ds.evaluate --config ds_configs/cpu_tiny.json \
        --checkpoint runs/cpu_tiny/checkpoints [--ks 1,2,4,8]

It prints a table and writes ``self_slimming.json`` and ``self_slimming.png`` to its own folder,
``--out``, by default ``run.out_dir/eval/<tag>`` (the checkpoint's tag, e.g. ``step500``): never
over the training run's own table in run.out_dir. An exported model (``smoe_ds.convert``) is
evaluated on one device, with tokens/s per k, into ``MODEL_DIR/eval`` by default:

    python -m smoe_ds.evaluate runs/cpu_tiny/export --ks 1,2,4,8 --data my_corpus.txt

``--ks`` takes a list of k, as everywhere a list of k is given; ``--k``, its old spelling here,
still works with a one-line warning (in smoe-convert and smoe-generate ``--k`` is one integer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from smoe_ds.config.renamed import add_renamed_option
from smoe_ds.training.self_slimming import format_table, report, self_slimming_sweep, write_results


def parse_ks(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"smoe-ds: error: --ks expects comma-separated integers, got {text!r}") from None


def checkpoint_eval_dir(out_dir: str | Path, tag_dir: Path) -> Path:
    """Where a checkpoint's evaluation goes by default: ``out_dir/eval/<tag>``. Its own folder, so
    that it never writes over the training run's self_slimming.json and .png in ``out_dir``, and
    evaluations of different checkpoints of one run keep each their own."""
    return Path(out_dir) / "eval" / tag_dir.name


def evaluate_export(
    model_dir: str,
    ks: list[int] | None,
    data: str | None,
    device: str,
    batches: int,
    micro_batch: int,
    out_dir: str | None,
) -> list[dict]:
    """The self-slimming sweep of an exported model on one device, with tokens/s per k."""
    from smoe_ds.config.schema import ConfigError, DataConfig
    from smoe_ds.data import eval_batches, load_corpus
    from smoe_ds.inference import load_model

    model = load_model(model_dir, device)
    n = model.num_experts
    ks = ks or [1 << i for i in range(n.bit_length()) if (1 << i) < n] + [n]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"--ks values must be in [1, {n}], got {bad}")
    tokenizer = model_dir if (Path(model_dir) / "tokenizer_config.json").is_file() else None
    corpus = load_corpus(DataConfig(path=data, tokenizer=tokenizer), model.lm.cfg.block_size)
    val = eval_batches(corpus.val_blocks, micro_batch, 0, 1, batches)
    rows = self_slimming_sweep(model.lm, val, ks, corpus.bytes_per_token)
    print("\n" + format_table(rows, f"self-slimming: {model_dir} on {data or 'the default corpus'} ({device})"))
    json_path, png_path = write_results(
        rows,
        out_dir or Path(model_dir) / "eval",
        {"title": f"self-slimming: {Path(model_dir).name}", "model": str(model_dir), "data": data, "device": device},
    )
    print(f"wrote {json_path} and {png_path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from smoe_ds import checkpoint
    from smoe_ds.cli import run_main
    from smoe_ds.config.schema import load_config
    from smoe_ds.training.runtime import build_runtime

    p = argparse.ArgumentParser(prog="smoe-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", help="an exported model (smoe_ds.convert); evaluated on one device")
    p.add_argument("--config", help="with --checkpoint: the JSON config the checkpoint was trained with")
    p.add_argument("--checkpoint", help="with --config: the checkpoint folder (run.out_dir/checkpoints)")
    p.add_argument("--ks", default=None, help="comma-separated k values (default: 1, 2, 4, ..., N)")
    add_renamed_option(p, "--k", "--ks")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--data", default=None, help="exported model: text file, folder or hub name (default corpus)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=16, help="exported model: validation batches")
    p.add_argument("--micro-batch", type=int, default=8, help="exported model: sequences per batch")
    p.add_argument(
        "--out", default=None, help="output folder (default: MODEL_DIR/eval, or run.out_dir/eval/TAG for --checkpoint)"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if bool(args.model_dir) == bool(args.config or args.checkpoint):
        p.error("give either MODEL_DIR (an exported model) or --config and --checkpoint (a DeepSpeed checkpoint)")
    if args.model_dir:
        ks = parse_ks(args.ks) if args.ks else None
        return run_main(
            lambda: evaluate_export(
                args.model_dir, ks, args.data, args.device, args.batches, args.micro_batch, args.out
            )
        )
    if not (args.config and args.checkpoint):
        p.error("--config and --checkpoint go together")

    def job() -> None:
        cfg = load_config(args.config, args.set)
        if args.ks:
            cfg.run.eval_ks = parse_ks(args.ks)
            cfg.validate()
        tag_dir = checkpoint.resolve_tag_dir(args.checkpoint)  # one line if missing or incomplete
        rt = build_runtime(cfg)
        # smoe-ds's whole-model files, so any stage, world size and ep_size can evaluate any checkpoint
        path = checkpoint.load_weights(rt.engine, cfg, tag_dir)
        report(
            rt.engine,
            rt.val_batches(cfg.run.final_eval_batches),
            cfg.run.eval_ks,
            rt.corpus.bytes_per_token,
            args.out or checkpoint_eval_dir(cfg.run.out_dir, tag_dir),
            {"title": f"self-slimming: {args.checkpoint}", "checkpoint": str(path), "mode": cfg.moe.mode},
            masked=rt.masking is not None,
        )

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
