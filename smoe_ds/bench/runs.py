"""The trainer run as the end-to-end benchmarks run it: one variant per launch, its summary read back.

Each variant is ``smoe_ds.train`` in processes of its own: plain ``python -m`` for one rank, the
deepspeed launcher for more (as users launch). Its output is kept and shown only if it fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from smoe_ds.distributed.process_group import free_port

REPO_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"


def add_out_argument(parser: argparse.ArgumentParser, root: str) -> None:
    """``--out``: a new folder for the benchmark's runs and results, by default ``root/<date-time>``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"a new folder for the runs and results (default: {root}/<date>-<time>); one that already "
        "holds files is refused, so no earlier result is overwritten or resumed",
    )


def fresh_out_dir(out: Path | None, root: str) -> Path:
    """``out``, or ``root/<date>-<time>``, created; refuses (exit 2, one line) a folder that holds files.

    The trainer resumes from a checkpoint it finds, so a benchmark rerun into the folder of an
    earlier one would time nothing and report the earlier run's figures as new."""
    out = out if out is not None else Path(root) / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"smoe-ds: error: --out {out} already holds results; choose a new folder", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    return out


def trainer_command(config: Path, ranks: int, overrides: list[str]) -> list[str]:
    """argv for ``smoe_ds.train`` on ``ranks`` local ranks with ``--set`` ``overrides`` (KEY=VALUE)."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "smoe_ds.train"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
        cmd += ["--master_port", str(free_port()), "--module", "smoe_ds.train"]
    cmd += ["--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_trainer(label: str, config: Path, ranks: int, sets: dict, user_sets: list[str], out_dir: Path) -> dict:
    """Train one variant into ``out_dir`` and return its ``train_summary.json``.

    ``sets`` (key -> value) are the benchmark's overrides, ``user_sets`` ("KEY=VALUE") the user's,
    applied after them. Exits with the run's last output lines if the trainer fails.
    """
    overrides = [f"{key}={value}" for key, value in {**sets, "run.out_dir": out_dir}.items()] + user_sets
    cmd = trainer_command(config, ranks, overrides)
    print(f"[{label}]", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"[{label}] the trainer failed (exit {proc.returncode}); its last lines are above")
    return json.loads((out_dir / "train_summary.json").read_text())
