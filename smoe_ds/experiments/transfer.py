"""Transfer: fine-tune several models pretrained by smoe_ds.train on one labelled task, with the same
budget and seeds, and compare them at every k (the paper's Table 2 question: does SMoE-Dropout
pretraining transfer better than dense pretraining?).

    python -m smoe_ds.experiments.transfer --pretrained [NAME=]DIR1 [NAME=]DIR2 ... --train TRAIN --validation DEV
        --out OUT [--seeds 0,1] [--steps 300] [--config ds_configs/finetune_minilm_sst2.json]
        [--set KEY=VALUE ...]

Each DIR is an export (``smoe_ds.convert``) or a checkpoint folder of ``smoe_ds.train``; each is
fine-tuned by ``smoe_ds.finetune`` (classification) under the deepspeed launcher with its own
``moe.mode`` and N (read from it) and the config's everything else. As in the paper's transfer
runs, k is constant at N unless ``--set moe.k_schedule...`` says otherwise. OUT receives
``configs/``, ``runs/NAME/seedS/`` (NAME: given, or the run folder's name, so that
``runs/dense/seed0/checkpoints`` is ``dense_seed0``), ``results.md`` (accuracy and loss at every
k, mean ± sd over seeds, and every model at full width against the first one given),
``results.json`` and ``accuracy_vs_k.png``. Interrupted, it continues: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from smoe_ds.config.schema import apply_override
from smoe_ds.experiments.paper import add_ranks_option, parse_seeds, ranks_per_node, train_method
from smoe_ds.experiments.report import compare, finish_k_axes, plot_against_k, write_outputs

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "finetune_minilm_sst2.json"


def pretrained_moe(path: Path) -> dict:
    """The pretrained run's ``moe`` section: from the export's config.json, or the checkpoint's run config."""
    config = path / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("moe", {})
    run_config = path.parent / "config.json"  # a checkpoints folder sits in its run folder
    if (path / "latest").is_file() and run_config.is_file():
        return json.loads(run_config.read_text())["moe"]
    raise SystemExit(f"smoe-ds: error: {path} is neither a smoe-ds export nor a smoe_ds.train checkpoint folder")


def model_name(path: Path) -> str:
    """A readable name for a pretrained folder: ``runs/dense/seed0/checkpoints`` -> ``dense_seed0``.

    ``checkpoints`` and ``export`` name nothing, so their run folder does; a run folder called
    ``seedN`` (the experiments' layout) is prefixed by its method's folder, so that the same seed of
    two methods gets two names."""
    if path.name in ("checkpoints", "export"):
        path = path.parent
    if path.name.startswith("seed") and path.name[4:].isdigit() and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.name


def parse_pretrained(item: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named by :func:`model_name`)."""
    name, sep, folder = item.partition("=")
    if sep and name and "/" not in name:
        return name, Path(folder)
    return model_name(Path(item).absolute()), Path(item)


def build_config(args, pretrained: Path, run_dir: Path, seed: int) -> dict:
    raw = json.loads(args.config.read_text())
    moe = pretrained_moe(pretrained)
    n = moe.get("num_experts", 1)
    mode = moe.get("mode", "smoe_dropout")
    raw["hf"].update(model=str(pretrained.absolute()), task="classification")
    raw["moe"].update(mode=mode, num_experts=n, k_schedule={"kind": "linear", "k_min": n, "k_max": n})
    raw["moe"].pop("k", None)
    if mode == "dense" or raw["moe"].get("ep_size", 1) > n:
        raw["moe"]["ep_size"] = 1
    raw["data"].update(path=str(args.train.absolute()), validation=str(args.validation.absolute()), seed=seed)
    raw["run"].update(out_dir=str(run_dir), seed=seed, max_steps=args.steps)
    for item in args.set:
        apply_override(raw, item)
    return raw


def collect(out: Path) -> dict:
    """name -> [{"seed", "rows": the self-slimming rows}] for every finished run."""
    found: dict = {}
    for summary in sorted((out / "runs").glob("*/seed*/train_summary.json")):
        run = summary.parent
        rows = json.loads(summary.read_text())["self_slimming"]
        found.setdefault(run.parent.name, []).append({"seed": int(run.name.removeprefix("seed")), "rows": rows})
    return found


def results_table(found: dict, baseline: str | None = None) -> str:
    """The markdown table of every model at every k; with ``baseline``, each other model against it."""
    lines = [
        "Validation accuracy (loss) of each pretrained model after the same fine-tuning, mean ± sd over seeds, "
        "at k active experts (a dense model has one width).",
        "",
        "| pretrained model | seeds | k | accuracy | loss |",
        "|---|---|---|---|---|",
    ]
    for name, runs in found.items():
        ks = sorted({r["k"] for run in runs for r in run["rows"]})
        for k in ks:
            acc = [r["accuracy"] for run in runs for r in run["rows"] if r["k"] == k]
            loss = [r["loss"] for run in runs for r in run["rows"] if r["k"] == k]
            lines.append(f"| {name} | {len(runs)} | {k} | {_mean_sd(acc, 4)} | {_mean_sd(loss, 4)} |")
    if baseline in found:
        lines += ["", *full_width_comparisons(found, baseline)]
    return "\n".join(lines)


def full_width_accuracies(runs: list[dict]) -> list[float]:
    """Each seed's accuracy at the model's largest k (every expert: the paper's transfer setting)."""
    return [max(run["rows"], key=lambda r: r["k"])["accuracy"] for run in runs]


def full_width_comparisons(found: dict, baseline: str) -> list[str]:
    """One line per other model: its accuracy at full width minus the baseline's, with the verdict
    of ``compare`` (a difference counts beyond twice its standard error over fine-tuning seeds)."""
    base = full_width_accuracies(found[baseline])
    lines = [f"At full width, against `{baseline}` (a difference counts beyond twice its standard error):", ""]
    for name, runs in found.items():
        if name == baseline:
            continue
        c = compare(full_width_accuracies(runs), base)
        if c["se"] is None:
            verdict = "one seed on a side: no verdict"
        else:
            verdict = f"2 se = {2 * c['se']:.4f}: " + ("a real difference" if c["significant"] else "inconclusive")
        lines.append(f"- `{name}`: {c['diff']:+.4f} accuracy ({verdict})")
    return lines


def _mean_sd(values: list[float], digits: int) -> str:
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def write_plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, runs) in enumerate(found.items()):
        ks = sorted({r["k"] for run in runs for r in run["rows"]})
        means = [statistics.fmean(r["accuracy"] for run in runs for r in run["rows"] if r["k"] == k) for k in ks]
        plot_against_k(ax, name, ks, means, f"C{i}")
    finish_k_axes(ax, "validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.experiments.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pretrained",
        nargs="+",
        required=True,
        metavar="[NAME=]DIR",
        help="exports or checkpoint folders, each optionally named (default name: the run folder's)",
    )
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--validation", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every run")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the fine-tuning config every run starts from")
    add_ranks_option(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning override for every run")
    args = p.parse_args(argv)
    names, folders = zip(*(parse_pretrained(item) for item in args.pretrained))
    for path in (*folders, args.train, args.validation, args.config):
        if not path.exists():
            p.error(f"{path} does not exist")
    if len(set(names)) != len(names):
        p.error(f"two pretrained models share a name ({', '.join(names)}); name them with NAME=DIR")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    seeds = parse_seeds(args.seeds)
    out = args.out.absolute()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    runs = [(seed, name, path) for seed in seeds for name, path in zip(names, folders)]
    for i, (seed, name, path) in enumerate(runs, 1):
        run_dir = out / "runs" / name / f"seed{seed}"
        label = f"[{i}/{len(runs)}] {name} seed {seed}"
        if (run_dir / "train_summary.json").is_file():
            print(f"{label}: done already, skipped", flush=True)
            continue
        config_path = out / "configs" / f"{name}_seed{seed}.json"
        config_path.write_text(json.dumps(build_config(args, path, run_dir, seed), indent=2) + "\n")
        print(f"{label}: fine-tuning", flush=True)
        train_method(f"{name}/{seed}", config_path, run_dir, args.ranks or ranks_per_node(), module="smoe_ds.finetune")
    found = collect(out)
    write_outputs(out, found, results_table(found, baseline=names[0]), write_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
