"""What each rank holds at every ZeRO stage: the same job at stages 0-3 and with optimizer offload,
measured, beside what smoe-tune's memory model predicts.

    python -m smoe_ds.bench.memory [--ranks 4] [--steps 5] [--config ds_configs/cpu_tiny.json] [--out DIR]
        [--ep-sizes 1,2,4] [--set KEY=VALUE ...]

Each variant is ``smoe_ds.train`` under the deepspeed launcher (``--ranks`` ranks; once per
``--ep-sizes`` value, default the config's ep_size), a few steps, no checkpoint; the trainer
records each rank's model-state bytes from the engine's tensors (``smoe_ds.distributed.memory``).
Prints a table (the largest rank of each variant, since ranks can differ slightly) with the
model-state bytes ``smoe_ds.tuning.memory_model`` predicts and its error, and writes
``DIR/bench_memory.json`` with every rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smoe_ds.bench.runs import REPO_CONFIG, add_out_argument, fresh_out_dir, run_trainer
from smoe_ds.config.schema import load_config

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


def variant_sets(name: str, args, ep_size: int | None) -> dict:
    """The trainer overrides of variant ``name`` (a VARIANTS key) at ``ep_size`` (None: the config's)."""
    zero, cpu_adam = VARIANTS[name]
    sets = {
        "zero_optimization": json.dumps(zero),
        "optimizer.params.torch_adam": json.dumps(not cpu_adam),  # offload is built for DeepSpeedCPUAdam
        "run.max_steps": args.steps,
        "run.eval_interval": 0,
        "run.save_checkpoint": "false",
        "run.final_eval_batches": 1,
    }
    return sets if ep_size is None else {**sets, "moe.ep_size": ep_size}


def run_variant(label: str, sets: dict, args, out: Path) -> list[dict]:
    folder = out / label.replace(" + ", "_").replace("-", "").replace(", ", "_").replace(" ", "").lower()
    return run_trainer(label, args.config, args.ranks, sets, args.set, folder)["memory_per_rank"]


def predicted_state(args, sets: dict) -> int:
    """The model-state bytes per rank (weights, masters, moments) ``smoe_ds.tuning.memory_model``
    predicts for the variant's config on ``args.ranks`` ranks."""
    from smoe_ds.tuning.memory_model import count_parameters, predict, vocab_size

    cfg = load_config(str(args.config), [f"{k}={v}" for k, v in sets.items()] + args.set)
    cfg.model.vocab_size = vocab_size(cfg)
    return predict(cfg, args.ranks, count_parameters(cfg), 0, accelerator_is_host=True).model_state


def kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def largest_state(ranks: list[dict]) -> int:
    """The largest rank's model-state bytes (weights, masters, moments)."""
    return max(sum(r[k] for k in KINDS) for r in ranks)


def table(results: dict[str, list[dict]], predicted: dict[str, int]) -> str:
    lines = [
        f"{'variant':<30} {'params KiB':>11} {'fp32 master KiB':>16} {'Adam moments KiB':>17} "
        f"{'state total KiB':>16} {'predicted KiB':>14} {'error':>7} {'peak RSS MiB':>13}"
    ]
    for name, ranks in results.items():
        biggest = max(ranks, key=lambda r: sum(r[k] for k in KINDS))
        total = largest_state(ranks)
        lines.append(
            f"{name:<30} {kib(biggest['parameters']):>11} {kib(biggest['master_weights']):>16} "
            f"{kib(biggest['optimizer_moments']):>17} {kib(total):>16} {kib(predicted[name]):>14} "
            f"{(predicted[name] - total) / total:>7.1%} {max(r['peak_rss'] for r in ranks) / 2**20:>13,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO_CONFIG, help="the job (its model, ep_size and optimizer)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    add_out_argument(p, "runs/bench_memory")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the table")
    p.add_argument("--ep-sizes", default=None, help="comma-separated moe.ep_size values, each run with every variant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override for every run")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    ep_sizes = [int(e) for e in args.ep_sizes.split(",")] if args.ep_sizes else [None]
    args.out = fresh_out_dir(args.out, "runs/bench_memory")
    results, predicted = {}, {}
    for ep in ep_sizes:
        for name in names:
            label = name if ep is None else f"{name}, ep_size {ep}"
            sets = variant_sets(name, args, ep)
            predicted[label] = predicted_state(args, sets)
            results[label] = run_variant(label, sets, args, args.out)
    print(f"\nmodel state per rank, {args.ranks} ranks, {args.config.name} (largest rank of each variant)")
    print(table(results, predicted))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"settings": settings, "ranks": results, "predicted_model_state": predicted}
    (args.out / "bench_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
