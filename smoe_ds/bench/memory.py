"""What each rank holds at every ZeRO stage: the same job at stages 0-3 and with optimizer offload.

    python -m smoe_ds.bench.memory [--ranks 4] [--steps 5] [--config ds_configs/cpu_tiny.json] [--out DIR]
        [--set KEY=VALUE ...]

Each variant is ``smoe_ds.train`` under the deepspeed launcher (``--ranks`` ranks, the config's
ep_size), a few steps, no checkpoint; the trainer records each rank's model-state bytes from the
engine's tensors (``smoe_ds.distributed.memory``). Prints a table (the largest rank of each variant, since
ranks can differ slightly) and writes ``DIR/bench_memory.json`` with every rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smoe_ds.bench.runs import REPO_CONFIG, add_out_argument, fresh_out_dir, run_trainer

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
ZERO2 = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}
VARIANTS = {  # name -> (zero_optimization section, whether the optimizer is DeepSpeedCPUAdam)
    "ZeRO-0": ({"stage": 0}, False),
    "ZeRO-1": ({"stage": 1}, False),
    "ZeRO-2": (ZERO2, False),
    "ZeRO-3": ({"stage": 3}, False),
    "ZeRO-2 + offload": ({**ZERO2, **OFFLOAD}, True),
    "ZeRO-3 + offload": ({"stage": 3, **OFFLOAD}, True),
}
KINDS = ("parameters", "master_weights", "optimizer_moments")


def run_variant(name: str, args, out: Path) -> list[dict]:
    zero, cpu_adam = VARIANTS[name]
    folder = out / name.replace(" + ", "_").replace("-", "").lower()
    sets = {
        "zero_optimization": json.dumps(zero),
        "optimizer.params.torch_adam": json.dumps(not cpu_adam),  # offload is built for DeepSpeedCPUAdam
        "run.max_steps": args.steps,
        "run.eval_interval": 0,
        "run.save_checkpoint": "false",
        "run.final_eval_batches": 1,
    }
    return run_trainer(name, args.config, args.ranks, sets, args.set, folder)["memory_per_rank"]


def kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        f"{'variant':<18} {'params KiB':>11} {'fp32 master KiB':>16} {'Adam moments KiB':>17} "
        f"{'state total KiB':>16} {'peak RSS MiB':>13}"
    ]
    for name, ranks in results.items():
        biggest = max(ranks, key=lambda r: sum(r[k] for k in KINDS))
        total = sum(biggest[k] for k in KINDS)
        lines.append(
            f"{name:<18} {kib(biggest['parameters']):>11} {kib(biggest['master_weights']):>16} "
            f"{kib(biggest['optimizer_moments']):>17} {kib(total):>16} "
            f"{max(r['peak_rss'] for r in ranks) / 2**20:>13,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO_CONFIG, help="the job (its model, ep_size and optimizer)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    add_out_argument(p, "runs/bench_memory")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override for every run")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    args.out = fresh_out_dir(args.out, "runs/bench_memory")
    results = {name: run_variant(name, args, args.out) for name in names}
    print(f"\nmodel state per rank, {args.ranks} ranks, {args.config.name} (largest rank of each variant)")
    print(table(results))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "bench_memory.json").write_text(json.dumps({"settings": settings, "ranks": results}, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
