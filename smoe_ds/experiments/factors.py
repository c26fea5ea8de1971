"""Which factor makes SMoE-Dropout beat dense: the README's default job changed one factor at a time.

    python -m smoe_ds.experiments.factors --out DIR --data PATH [--max-bytes 303000]
        [--factors base,width,dropout,length,ep_size,all] [--seeds 0,1]

The default job (``ds_configs/cpu_tiny.json``: 500 steps, experts 64 wide, no dropout, ep_size 2,
k 4 -> 8, the 1/sqrt(d_model) router) sits where dense wins; the same job with experts 256 wide,
dropout 0.1, ep_size 1 and 1500 steps (k 4 -> 8 over the run) is where SMoE-Dropout won, in one
seed. Each factor below changes one of those four from the default (``all`` changes all four);
each is trained as dense and as SMoE-Dropout (equal parameters) at every seed, through the paper
experiment's runner, into ``DIR/FACTOR/`` with its own ``results.md`` (the claims' table compares
``smoe_dropout_linear``, the default job's k 4 -> 8 linear schedule, with ``dense``), and
``DIR/factors.md`` puts the factors side by side. Interrupted, the same command continues:
finished runs are skipped, an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smoe_ds.config.schema import apply_override
from smoe_ds.experiments.paper import add_ranks_option, parse_seeds, prepare_data, ranks_per_node, train_method
from smoe_ds.experiments.report import collect, compare, mean_std, run_folder, write_report

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"

FACTORS: dict[str, dict[str, object]] = {  # factor -> its overrides of the default job
    "base": {},
    "width": {"moe.d_expert": 256},  # dense d_ff 8 x 256 = 2048
    "dropout": {"model.dropout": 0.1},
    "length": {"run.max_steps": 1500},  # the k schedule's end_step follows max_steps
    "ep_size": {"moe.ep_size": 1},
}
FACTORS["all"] = {key: v for overrides in FACTORS.values() for key, v in overrides.items()}

METHODS = {"dense": {"moe.mode": "dense"}, "smoe_dropout_linear": {}}  # the default job is SMoE-Dropout
EVALUATIONS = 20  # periodic validations per run, for the best-validation and time-to-quality figures


def build_config(factor: str, method: str, data: str | None, out_dir: str, seed: int) -> dict:
    """The default job with ``factor``'s overrides, as ``method`` at ``seed`` (weights, router and
    dropout drawn from it; the data split and order stay data.seed 0's)."""
    raw = json.loads(DEFAULT_JOB.read_text())
    for key, value in {**FACTORS[factor], **METHODS[method]}.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    steps = raw["run"]["max_steps"]
    raw["model"]["init_seed"] = seed
    raw["moe"]["router_seed"] = 1234 + seed
    raw["data"].update(path=data, seed=0)
    raw["run"].update(
        out_dir=out_dir,
        seed=seed,
        eval_interval=max(1, steps // EVALUATIONS),
        save_interval=max(1, steps // 4),
        eval_ks=[raw["moe"]["num_experts"]] if method == "dense" else None,
    )
    return raw


def factors_table(out: Path, factors: list[str]) -> str:
    """Markdown: per factor, dense and SMoE-Dropout at k = N (final and best periodic validation,
    bits per byte, mean ± sd over seeds) and SMoE-Dropout - dense with twice its standard error."""
    columns = ["factor", "changes", "dense final", "SMoE-Dropout final", "SMoE - dense (2 se)", "dense best"]
    columns.append("SMoE-Dropout best")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for factor in factors:
        results = collect(out / factor) if (out / factor / "runs").is_dir() else {}
        if not results:  # nothing finished yet
            continue
        final = {m: [r["final_val_bpb"] for r in results.get(m, {}).values()] for m in METHODS}
        best = {m: [r["best_val_bpb"] for r in results.get(m, {}).values()] for m in METHODS}
        cmp = compare(final["smoe_dropout_linear"], final["dense"])
        diff = f"{cmp['diff']:+.4f}" + (f" ({2 * cmp['se']:.4f})" if cmp["se"] is not None else "")
        changes = ", ".join(f"{k}={v}" for k, v in FACTORS[factor].items()) or "(the default job)"
        lines.append(
            f"| {factor} | {changes} | {_stat(final['dense'])} | {_stat(final['smoe_dropout_linear'])} | {diff} | "
            f"{_stat(best['dense'])} | {_stat(best['smoe_dropout_linear'])} |"
        )
    return "\n".join(lines)


def _stat(values: list[float | None]) -> str:
    mean, std, n = mean_std(values)
    if not n:
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={n})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.experiments.factors", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for every factor's configs, runs and tables")
    p.add_argument("--data", default=None, help="a text file or folder (default: the embedded default corpus)")
    p.add_argument("--max-bytes", type=int, default=303_000, help="train on this many bytes of it (0 = all)")
    p.add_argument("--factors", default=",".join(FACTORS), help="comma-separated subset, run in this order")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    add_ranks_option(p)
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist")
    factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        p.error(f"unknown factor {unknown[0]!r}; choose from {', '.join(FACTORS)}")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, {"max_bytes": args.max_bytes}, out)  # one corpus slice for every factor
    runs = [(factor, seed, method) for seed in seeds for factor in factors for method in METHODS]
    for i, (factor, seed, method) in enumerate(runs, 1):
        run_dir = run_folder(out / factor, method, seed)
        label = f"[{i}/{len(runs)}] {factor}: {method} seed {seed}"
        if (run_dir / "train_summary.json").is_file():
            print(f"{label}: done already, skipped", flush=True)
            continue
        config_path = out / factor / "configs" / f"{method}_seed{seed}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config = build_config(factor, method, data, str(run_dir), seed)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"{label}: training", flush=True)
        train_method(f"{factor}/{method}/{seed}", config_path, run_dir, args.ranks or ranks_per_node())
        write_report(collect(out / factor), out / factor)
    (out / "factors.md").write_text(factors_table(out, factors) + "\n")
    print(f"wrote {out / 'factors.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
