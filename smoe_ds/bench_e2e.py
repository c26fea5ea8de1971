"""End-to-end benchmark: SMoE-Dropout (the paper's schedule, k linear N/2 -> N) against the
dense model with equal parameters, same data, steps and optimizer, through the real trainer.

    python -m smoe_ds.bench_e2e [--steps 60] [--d-model 256] [--experts 16] [--d-expert 512] [--out DIR]
        [--config ds_configs/gpu_bf16.json] [--set KEY=VALUE ...]

Each run is ``python -m smoe_ds.train`` in its own process (one rank, all cores); the trainer's
own wall time for the training steps (start-up and the final evaluation excluded) and its
tokens/s are compared. Prints a table and writes ``DIR/bench_e2e.json``. It runs where the
trainer does: on a GPU when there is one (e.g. with ``--config ds_configs/gpu_bf16.json``).
``--set`` passes a trainer override to both runs (after the benchmark's own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu_tiny.json"


def run_mode(mode: str, args, out: Path) -> dict:
    n = args.experts
    sets = {
        "moe.mode": mode,
        "moe.ep_size": 1,
        "moe.num_experts": n,
        "moe.d_expert": args.d_expert,
        "moe.k_schedule": json.dumps({"kind": "linear", "k_min": n // 2, "k_max": n}),
        "model.d_model": args.d_model,
        "model.n_layers": args.layers,
        "model.n_heads": max(1, args.d_model // 64),
        "model.block_size": args.block_size,
        "train_micro_batch_size_per_gpu": args.batch,
        "run.max_steps": args.steps,
        "run.eval_interval": 0,
        "run.save_checkpoint": "false",
        "run.eval_ks": json.dumps([n]),
        "run.final_eval_batches": 2,
        "run.eval_batches": 2,
        "run.out_dir": str(out / mode),
    }
    cmd = [sys.executable, "-m", "smoe_ds.train", "--config", str(args.config)]
    for item in [f"{key}={value}" for key, value in sets.items()] + args.set:
        cmd += ["--set", item]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / mode / "train_summary.json").read_text())
    return {
        "mode": mode,
        "train_wall_s": summary["train_wall_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_train_loss": summary["history"][-1]["loss"],
        "val_loss_at_k_N": summary["self_slimming"][-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench-e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO_CONFIG, help="base config (its optimizer and data are used)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/bench_e2e"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override for both runs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_mode(mode, args, args.out) for mode in ("dense", "smoe_dropout")]
    dense, smoe = rows
    ratio = smoe["train_wall_s"] / dense["train_wall_s"]
    print(
        f"\nend to end, {args.steps} steps, {args.layers} layers x d_model {args.d_model}, "
        f"{args.experts} experts x {args.d_expert} (dense d_ff {args.experts * args.d_expert}), "
        f"k {args.experts // 2} -> {args.experts} linear"
    )
    print(f"{'mode':>14} {'wall s':>8} {'tokens/s':>10} {'val loss k=N':>13}")
    for r in rows:
        print(f"{r['mode']:>14} {r['train_wall_s']:>8.1f} {r['tokens_per_s']:>10.0f} {r['val_loss_at_k_N']:>13.4f}")
    print(f"SMoE-Dropout wall time / dense: {ratio:.3f}")
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": rows,
        "wall_ratio_smoe_over_dense": ratio,
    }
    (args.out / "bench_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_e2e.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
