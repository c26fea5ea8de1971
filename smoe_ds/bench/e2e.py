"""End-to-end benchmark: the trainer with SMoE-Dropout against the dense model of equal parameters,
same data, steps and optimizer, and with more than one rank, expert parallelism against none.

    python -m smoe_ds.bench.e2e [--ranks 1] [--steps 60] [--config ds_configs/cpu_tiny.json]
        [--d-model D] [--layers L] [--experts N] [--d-expert H] [--block-size T] [--batch B]
        [--full-route-dispatch all_to_all,...] [--ep-exchange tokens,weights] [--out DIR] [--set KEY=VALUE ...]

Variants, each ``smoe_ds.train`` in its own processes (``smoe_ds.bench.runs``), in one run:
- ``--ranks 1``: dense, SMoE-Dropout;
- ``--ranks R`` (R > 1, the deepspeed launcher): dense, SMoE-Dropout at ep_size 1 (experts
  replicated, pure data parallel) and SMoE-Dropout at ep_size R (experts sharded), once per
  ``--ep-exchange`` (tokens travel by all-to-all, once per ``--full-route-dispatch``; or the
  experts' weights are gathered).
Every run records its step breakdown (``run.step_breakdown``: each phase of a step and each
collective inside it, mean over ranks, warm-up steps excluded); the table shows them side by side
with the trainer's wall time for the training steps (start-up and the final evaluation excluded).

The model is the config's unless a shape flag overrides it; ``--experts`` also sets the k
schedule to the paper's linear N/2 -> N. Writes ``DIR/bench_e2e.json``. It runs where the
trainer does: on a GPU with e.g. ``--config ds_configs/gpu_bf16.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smoe_ds.bench.runs import REPO_CONFIG, add_out_argument, fresh_out_dir, run_trainer
from smoe_ds.config.schema import EP_EXCHANGES, FULL_ROUTE_DISPATCH, MoEConfig
from smoe_ds.training.step_breakdown import format_table

SHAPE_FLAGS = {  # flag -> the config key it overrides
    "d_model": "model.d_model",
    "layers": "model.n_layers",
    "experts": "moe.num_experts",
    "d_expert": "moe.d_expert",
    "block_size": "model.block_size",
    "batch": "train_micro_batch_size_per_gpu",
}


def variants(ranks: int, full_route_dispatch: list[str], exchanges: tuple[str, ...]) -> dict[str, dict]:
    """Variant name -> its overrides: dense and SMoE-Dropout, and for ranks > 1 both ep_sizes. The
    sharded one runs once per ``moe.ep_exchange`` in ``exchanges``; moving tokens, once per
    ``full_route_dispatch`` given (none given: the config's)."""
    dense = {"moe.mode": "dense", "moe.ep_size": 1}
    if ranks == 1:
        return {"dense": dense, "smoe_dropout": {"moe.mode": "smoe_dropout", "moe.ep_size": 1}}
    out = {"dense": dense, "smoe_dropout ep_size 1": {"moe.mode": "smoe_dropout", "moe.ep_size": 1}}
    sharded = {"moe.mode": "smoe_dropout", "moe.ep_size": ranks}
    for exchange in exchanges:
        if exchange == "weights":
            out[f"smoe_dropout ep_size {ranks} weights"] = {**sharded, "moe.ep_exchange": "weights"}
            continue
        tokens = {**sharded, "moe.ep_exchange": "tokens"}
        if not full_route_dispatch:
            out[f"smoe_dropout ep_size {ranks}"] = tokens
        for how in full_route_dispatch:
            out[f"smoe_dropout ep_size {ranks} {how}"] = {**tokens, "moe.full_route_dispatch": how}
    return out


def common_overrides(args) -> dict:
    """The benchmark's overrides for every variant: steps, no checkpoint, the shape flags given."""
    sets = {
        "run.max_steps": args.steps,
        "run.eval_interval": 0,
        "run.save_checkpoint": "false",
        "run.final_eval_batches": 2,
        "run.step_breakdown": "true",
    }
    for flag, key in SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            sets[key] = getattr(args, flag)
    if args.d_model is not None:
        sets["model.n_heads"] = max(1, args.d_model // 64)
    if args.experts is not None:
        n = args.experts
        sets["moe.k_schedule"] = json.dumps({"kind": "linear", "k_min": n // 2, "k_max": n})
        sets["run.eval_ks"] = json.dumps([n])
    return sets


def run_variant(name: str, overrides: dict, args) -> dict:
    folder = args.out / name.replace(" ", "_")
    summary = run_trainer(name, args.config, args.ranks, {**common_overrides(args), **overrides}, args.set, folder)
    config = json.loads((folder / "config.json").read_text())
    return {
        "name": name,
        "mode": config["moe"]["mode"],
        "ep_size": config["moe"]["ep_size"],
        "train_wall_s": summary["train_wall_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_train_loss": summary["history"][-1]["loss"] if summary["history"] else None,
        "val_loss_at_k_N": summary["self_slimming"][-1]["loss"],
        "step_breakdown": summary["step_breakdown"],
    }


def ratios(rows: list[dict], ranks: int) -> dict:
    """Wall-time ratios of each SMoE-Dropout variant over dense and, with ranks > 1, of each sharded
    one over ep_size 1. The first sharded variant's are also given under the plain keys."""
    wall = {r["name"]: r["train_wall_s"] for r in rows}
    out = {f"wall_ratio {name} / dense": w / wall["dense"] for name, w in wall.items() if name != "dense"}
    first = rows[1 if ranks == 1 else 2]["name"]
    out["wall_ratio_smoe_over_dense"] = wall[first] / wall["dense"]
    if ranks > 1:
        for r in rows[2:]:
            out[f"wall_ratio {r['name']} / ep_size 1"] = r["train_wall_s"] / wall["smoe_dropout ep_size 1"]
        out[f"wall_ratio_ep{ranks}_over_ep1"] = wall[first] / wall["smoe_dropout ep_size 1"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench-e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO_CONFIG, help="base config (model, optimizer, data)")
    p.add_argument("--ranks", type=int, default=1, help="ranks per run; > 1 adds SMoE-Dropout at ep_size 1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--d-expert", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch", type=int, help="micro-batch per rank")
    p.add_argument(
        "--full-route-dispatch",
        default="",
        help="with --ranks > 1: comma-separated moe.full_route_dispatch values, one sharded run each",
    )
    p.add_argument(
        "--ep-exchange",
        default=MoEConfig.ep_exchange,
        help="with --ranks > 1: comma-separated moe.ep_exchange values (tokens, weights); tokens runs once"
        " per --full-route-dispatch value, weights once",
    )
    add_out_argument(p, "runs/bench_e2e")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override for every run")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the first step is never timed), got {args.steps}")
    how = [h.strip() for h in args.full_route_dispatch.split(",") if h.strip()]
    unknown = [h for h in how if h not in FULL_ROUTE_DISPATCH]
    if unknown:
        p.error(f"unknown --full-route-dispatch {unknown[0]!r}; choose from {', '.join(FULL_ROUTE_DISPATCH)}")
    exchanges = tuple(e.strip() for e in args.ep_exchange.split(",") if e.strip())
    bad = [e for e in exchanges if e not in EP_EXCHANGES] or ([] if exchanges else [args.ep_exchange])
    if bad:
        p.error(f"unknown --ep-exchange {bad[0]!r}; choose from {', '.join(EP_EXCHANGES)}")
    if how and "tokens" not in exchanges:
        p.error("--full-route-dispatch applies to moving tokens: add tokens to --ep-exchange")
    args.out = fresh_out_dir(args.out, "runs/bench_e2e")
    rows = [run_variant(name, overrides, args) for name, overrides in variants(args.ranks, how, exchanges).items()]
    result_ratios = ratios(rows, args.ranks)
    head = f"end to end, {args.ranks} rank(s), {args.steps} steps, {args.config.name}"
    print(f"\n{head}; step breakdown, mean over ranks:")
    print(format_table({r["name"]: r["step_breakdown"] for r in rows}))
    w = max(len(r["name"]) for r in rows) + 2
    print(f"\n{'variant':>{w}} {'wall s':>8} {'tokens/s':>10} {'val loss k=N':>13} {'/ dense':>8} {'/ ep_size 1':>12}")
    for r in rows:
        vs_dense = result_ratios.get(f"wall_ratio {r['name']} / dense")
        vs_ep1 = result_ratios.get(f"wall_ratio {r['name']} / ep_size 1")
        print(
            f"{r['name']:>{w}} {r['train_wall_s']:>8.1f} {r['tokens_per_s']:>10.0f} {r['val_loss_at_k_N']:>13.4f}"
            f" {_ratio(vs_dense):>8} {_ratio(vs_ep1):>12}"
        )
    print(f"SMoE-Dropout wall time / dense: {result_ratios['wall_ratio_smoe_over_dense']:.3f}")
    if args.ranks > 1:
        ep = result_ratios[f"wall_ratio_ep{args.ranks}_over_ep1"]
        print(f"SMoE-Dropout wall time, ep_size {args.ranks} / ep_size 1: {ep:.3f}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"settings": settings, "runs": rows, **result_ratios}
    (args.out / "bench_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_e2e.json'}")
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
