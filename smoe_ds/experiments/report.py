"""Tables and plots of the paper experiment, from the runs' own output files."""

from __future__ import annotations

import json
import math
from pathlib import Path

LN2 = math.log(2)


def collect(out: Path, names: list[str]) -> dict:
    """method -> {"bpb": {k: bits per byte}, "train_wall_s", "tokens_per_s", "history": [...]}."""
    results = {}
    for name in names:
        run = out / "runs" / name
        slim = json.loads((run / "self_slimming.json").read_text())["results"]
        summary = json.loads((run / "train_summary.json").read_text())
        results[name] = {
            "bpb": {int(r["k"]): r["bpb"] for r in slim},
            "train_wall_s": summary["train_wall_s"],
            "tokens_per_s": summary["tokens_per_s"],
            "history": [{"step": h["step"], "loss": h["loss"], "k": h["k"]} for h in summary["history"]],
        }
    return results


def markdown_table(results: dict) -> str:
    ks = sorted({k for r in results.values() for k in r["bpb"]})
    head = "| method | " + " | ".join(f"k={k}" for k in ks) + " | train wall (s) | tokens/s |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for name, r in results.items():
        cells = [f"{r['bpb'][k]:.4f}" if k in r["bpb"] else "" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_wall_s']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def _bpb_by_k(r: dict) -> tuple[list, list]:
    return list(r["bpb"]), list(r["bpb"].values())


def _loss_by_step(r: dict) -> tuple[list, list]:
    return [h["step"] for h in r["history"]], [h["loss"] / LN2 for h in r["history"]]


def _k_by_step(r: dict) -> tuple[list, list]:
    return [h["step"] for h in r["history"]], [h["k"] for h in r["history"]]


def write_report(results: dict, out: Path) -> list[Path]:
    """results.md, results.json and the three plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = out / "results.md"
    md.write_text(
        "Validation bits per byte (lower is better) of each method evaluated at k active experts, "
        "with training wall time and throughput.\n\n" + markdown_table(results) + "\n"
    )
    js = out / "results.json"
    js.write_text(json.dumps(results, indent=2) + "\n")
    paths = [md, js]
    plots = {
        "self_slimming.png": ("active experts k at evaluation", "bits per byte", _bpb_by_k),
        "loss_vs_step.png": ("training step", "training loss (bits per token)", _loss_by_step),
        "k_vs_step.png": ("training step", "active experts k", _k_by_step),
    }
    for file, (xlabel, ylabel, series) in plots.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, r in results.items():
            xs, ys = series(r)
            if file == "self_slimming.png" and len(xs) == 1:  # dense: one width, a reference level
                ax.axhline(ys[0], linestyle="--", color="black", label=f"{name} (k = N)")
                continue
            ax.plot(xs, ys, marker="o" if file == "self_slimming.png" else None, label=name)
        if file == "self_slimming.png":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        paths.append(out / file)
    return paths
