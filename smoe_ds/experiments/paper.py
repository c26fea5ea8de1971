"""Reproduce the paper's comparison at small scale: dense vs learned SMoE vs THOR vs the frozen
random router at fixed k vs SMoE-Dropout (three k schedules), with self-slimming curves.

    python -m smoe_ds.experiments.paper --out DIR [--data PATH] [--scale tiny|overparam|paper]
        [--seeds 0,1,2] [--methods dense,smoe_dropout_linear] [--max-bytes N] [--ranks R]

Each method is trained by the ordinary trainer under the deepspeed launcher (every local GPU,
or 2 CPU ranks), with the same data, seed, steps, optimizer, dropout and parameter count, then
evaluated at every k in {1, 2, 4, ..., N}; with several seeds, once per seed. DIR receives
``configs/`` (the exact config of every run), ``runs/METHOD/seedS/`` (each run's own outputs and
``train.log``), ``corpus.txt`` (the slice trained on, where the scale takes one), ``results.md``
(means, standard deviations and the claims' verdicts), ``results.json`` and the plots.
Interrupted, the same command continues: finished runs are skipped and an unfinished one
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smoe_ds.config.renamed import add_renamed_option
from smoe_ds.experiments.corpus import write_slice
from smoe_ds.experiments.methods import SCALES, build_config, methods
from smoe_ds.experiments.report import collect, run_folder, write_report


def ranks_per_node() -> int:
    import torch

    return torch.cuda.device_count() or 2


def add_ranks_option(p: argparse.ArgumentParser) -> None:
    """``--ranks``, the rank count's name in every command (the benches' too); ``--nproc``, its old
    name in the experiments, still works with a one-line warning."""
    p.add_argument("--ranks", type=int, default=None, help="ranks (default: every GPU, or 2 on a CPU machine)")
    add_renamed_option(p, "--nproc", "--ranks")


def train_method(name: str, config_path: Path, run_dir: Path, ranks: int, module: str = "smoe_ds.train") -> None:
    """Train one method (``module``: the trainer, or ``smoe_ds.finetune``) under the deepspeed
    launcher, echoing its output and keeping train.log."""
    from smoe_ds.distributed.process_group import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd += ["--module", module, "--config", str(config_path)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if not line.startswith("[20"):  # DeepSpeed's own timestamped log lines stay in the file
                print(f"  [{name}] {line}", end="", flush=True)
        if proc.wait() != 0:
            raise SystemExit(
                f"smoe-ds: error: {name} failed (exit {proc.returncode}); its log is {run_dir / 'train.log'}. "
                "Run the same command again to continue: finished runs are skipped."
            )


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"smoe-ds: error: --seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"smoe-ds: error: --seeds needs distinct non-negative integers, got {text!r}")
    return seeds


def prepare_data(args, scale: dict, out: Path) -> str | None:
    """The corpus path the runs train on: --data itself, or its first --max-bytes in out/corpus.txt."""
    max_bytes = scale["max_bytes"] if args.max_bytes is None else args.max_bytes
    if not max_bytes:
        return str(Path(args.data).absolute()) if args.data else None
    corpus = out / "corpus.txt"
    if not corpus.is_file():  # a rerun keeps the slice the finished runs were trained on
        _, written, available = write_slice(args.data, max_bytes, corpus)
        print(
            f"corpus: the first {written:,} of {available:,} bytes of {args.data or 'the default corpus'} -> {corpus}"
        )
    return str(corpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.experiments.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for configs, runs, tables and plots")
    p.add_argument("--data", default=None, help="a text file or folder (default: the embedded default corpus)")
    p.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each method runs once per seed (default: 0)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="train on the first this many bytes of the corpus (default: the scale's; 0 = all of it)",
    )
    add_ranks_option(p)
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist")
    if args.max_bytes is not None and args.max_bytes < 0:
        p.error("--max-bytes must be >= 0")
    scale = SCALES[args.scale]
    seeds = parse_seeds(args.seeds)
    every = list(methods(scale["moe"]["num_experts"], scale["steps"]))
    names = every if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(names) - set(every))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {every}")
    out = Path(args.out).absolute()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, scale, out)
    runs = [(name, seed) for seed in seeds for name in names]
    start = time.time()
    for i, (name, seed) in enumerate(runs, 1):
        run_dir = run_folder(out, name, seed)
        label = f"[{i}/{len(runs)}] {name} seed {seed}"
        if (run_dir / "train_summary.json").is_file():
            print(f"{label}: done already, skipped", flush=True)
            continue
        config_path = out / "configs" / f"{name}_seed{seed}.json"
        config_path.write_text(json.dumps(build_config(args.scale, name, data, str(run_dir), seed), indent=2) + "\n")
        print(f"{label}: training ({time.time() - start:.0f}s so far)", flush=True)
        train_method(f"{name}/{seed}", config_path, run_dir, args.ranks or ranks_per_node())
    # The report covers every finished run in the folder, including other invocations' seeds and methods.
    results = collect(out)
    for path in write_report(results, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
