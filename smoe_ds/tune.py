"""Tune a smoe-train config for this machine: the MoE knobs DeepSpeed's autotuner does not know.

    smoe-tune --config ds_configs/cpu_tiny.json [--ranks 2] [--memory-budget 8GiB] [--time-budget 300]

Enumerates micro-batch x gradient accumulation (the global batch fixed), moe.ep_size (divisors of
the world size and N), moe.ep_exchange, the ZeRO stage and optimizer offload; prunes what the memory
model says will not fit the budget per rank; times the rest one knob at a time with short real
runs of smoe-train; and confirms the winner against your config back to back. Writes
``tuned_config.json`` (smoe-train runs it as it is), ``tune_report.md`` and ``tune_report.json``
into ``--out``. Run the same command again to go on after a stop or an exhausted time budget.
The work is ``smoe_ds.tuning`` (docs/tuning.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_ranks() -> int:
    """Every local GPU, else 2 CPU ranks (as launch/local.sh)."""
    import torch

    return torch.cuda.device_count() or 2


def default_memory_budget(ranks: int) -> int:
    """The first GPU's memory, else this machine's available memory shared by the ranks."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // ranks


def main(argv: list[str] | None = None) -> int:
    from smoe_ds.cli import run_main
    from smoe_ds.tuning.candidates import KNOBS
    from smoe_ds.tuning.tuner import Settings, parse_bytes, tune

    p = argparse.ArgumentParser(prog="smoe-tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the smoe-train config to tune")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key first")
    p.add_argument("--ranks", type=int, default=None, help="ranks on this machine (default: every GPU, else 2)")
    p.add_argument(
        "--memory-budget",
        default=None,
        help="bytes per rank for the job's tensors, e.g. 70GiB (default: the GPU's memory, else the "
        "available memory shared by the ranks); leave the process's own out (docs/tuning.md)",
    )
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of trials, this sitting (default 300)")
    p.add_argument("--trial-steps", type=int, default=24, help="training steps per trial (default 24)")
    p.add_argument(
        "--knobs", default=",".join(KNOBS), help=f"comma-separated, searched in order (default {','.join(KNOBS)})"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="the tuning's folder (default runs/tune/<config>-<ranks>ranks)"
    )
    args = p.parse_args(argv)

    def job() -> None:
        from smoe_ds.config.schema import ConfigError

        ranks = args.ranks or default_ranks()
        knobs = [k.strip() for k in args.knobs.split(",") if k.strip()]
        unknown = [k for k in knobs if k not in KNOBS]
        if unknown or not knobs:
            raise ConfigError(
                f"--knobs: unknown {unknown[0]!r}; choose from {', '.join(KNOBS)}" if unknown else "--knobs is empty"
            )
        if ranks < 1 or args.trial_steps < 4 or args.time_budget <= 0:
            raise ConfigError("--ranks must be >= 1, --trial-steps >= 4 and --time-budget positive")
        if not Path(args.config).is_file():
            raise ConfigError(f"config file not found: {args.config}")
        import torch

        tune(
            Settings(
                config=args.config,
                sets=args.set,
                ranks=ranks,
                memory_budget_bytes=parse_bytes(args.memory_budget)
                if args.memory_budget
                else default_memory_budget(ranks),
                time_budget_s=args.time_budget,
                trial_steps=args.trial_steps,
                knobs=knobs,
                out=args.out or Path("runs/tune") / f"{Path(args.config).stem}-{ranks}ranks",
                accelerator_is_host=not torch.cuda.is_available(),
            )
        )

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
