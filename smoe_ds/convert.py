"""DeepSpeed checkpoint -> one Hugging Face directory for single-device inference.

    python -m smoe_ds.convert runs/cpu_tiny/checkpoints runs/cpu_tiny/export

Takes a checkpoint of any ZeRO stage 0-2, ep_size and world size (the folder with ``latest``
or one tag folder), needs no process group, and writes ``model.safetensors`` (every expert
and every non-expert weight) and ``config.json`` (model config, N, router seed, the training
k schedule) that ``AutoModelForCausalLM.from_pretrained`` reads after ``import smoe_ds``.
The work is ``smoe_ds.checkpoint.export.convert``.
"""

from __future__ import annotations

import argparse
import sys

from smoe_ds.checkpoint.export import convert


def main(argv: list[str] | None = None) -> int:
    from smoe_ds.cli import run_main

    p = argparse.ArgumentParser(prog="smoe-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder (with 'latest') or one tag folder in it")
    p.add_argument("out_dir", help="where to write model.safetensors and config.json")
    p.add_argument("--k", type=int, default=None, help="active experts stored as the default (default: N)")
    args = p.parse_args(argv)
    return run_main(lambda: convert(args.checkpoint, args.out_dir, args.k))


if __name__ == "__main__":
    sys.exit(main())
