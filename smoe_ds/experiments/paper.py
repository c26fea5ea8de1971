"""Reproduce the paper's comparison at small scale: dense vs learned SMoE vs THOR vs the frozen
random router at fixed k vs SMoE-Dropout (three k schedules), with self-slimming curves.

    python -m smoe_ds.experiments.paper --out DIR [--data PATH] [--scale tiny|small|paper]

Each method is trained by the ordinary trainer under the deepspeed launcher (every local GPU,
or 2 CPU ranks), with the same data, seed, steps, optimizer and parameter count, then evaluated
at every k in {1, 2, 4, ..., N}. DIR receives ``configs/`` (the exact config of every run),
``runs/METHOD/`` (each run's own outputs and ``train.log``), ``results.md``, ``results.json``
and three plots. Interrupted, the same command continues: finished methods are skipped and an
unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smoe_ds.experiments.methods import SCALES, build_config, methods
from smoe_ds.experiments.report import collect, write_report


def ranks_per_node() -> int:
    import torch

    return torch.cuda.device_count() or 2


def train_method(name: str, config_path: Path, run_dir: Path, nproc: int) -> None:
    """Train one method under the deepspeed launcher, echoing its output and keeping train.log."""
    from smoe_ds.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    cmd += ["--module", "smoe_ds.train", "--config", str(config_path)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
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
                "Run the same command again to continue from its last checkpoint."
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.experiments.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for configs, runs, tables and plots")
    p.add_argument("--data", default=None, help="a text file or folder (default: the embedded default corpus)")
    p.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: every GPU, or 2 on a CPU machine)")
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist")
    scale = SCALES[args.scale]
    every = list(methods(scale["moe"]["num_experts"], scale["steps"]))
    names = every if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(names) - set(every))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {every}")
    out = Path(args.out).absolute()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).absolute()) if args.data else None
    start = time.time()
    for i, name in enumerate(names, 1):
        run_dir = out / "runs" / name
        if (run_dir / "train_summary.json").is_file():
            print(f"[{i}/{len(names)}] {name}: done already, skipped", flush=True)
            continue
        config_path = out / "configs" / f"{name}.json"
        config_path.write_text(json.dumps(build_config(args.scale, name, data, str(run_dir)), indent=2) + "\n")
        print(f"[{i}/{len(names)}] {name}: training ({time.time() - start:.0f}s so far)", flush=True)
        train_method(name, config_path, run_dir, args.nproc or ranks_per_node())
    results = collect(out, names)
    for path in write_report(results, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
