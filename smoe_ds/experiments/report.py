"""Tables, verdicts and plots of the paper experiment, from the runs' own output files.

Every run lives in ``runs/METHOD/seedS/``. A method's figure is the mean over its seeds with
the sample standard deviation; a comparison of two methods counts as a difference only when
the difference of their means is larger than twice its standard error,
sqrt(s_a^2 / n_a + s_b^2 / n_b). With one seed per method there is no standard error, and
every comparison is inconclusive.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

LN2 = math.log(2)
SMOE, DENSE = "smoe_dropout_linear", "dense"  # the pair the claims compare


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def read_run(run: Path) -> dict:
    """One finished run: bits per byte per k (and with 1/N weighting at k = N), the validation
    history in bits per byte at k = N, its best and final values, and the training time."""
    slim = json.loads((run / "self_slimming.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    rows = slim["results"]
    n = slim.get("num_experts", max(int(r["k"]) for r in rows))
    to_bpb = rows[0]["bpb"] / rows[0]["loss"]  # 1 / (ln 2 * bytes per token)
    curve = [
        {"step": h["step"], "train_wall_s": h.get("train_wall_s"), "bpb": h[f"k={n}"] * to_bpb}
        for h in summary.get("val_history", [])
        if f"k={n}" in h
    ]
    full = next(r for r in rows if int(r["k"]) == n)
    loads = [h["load_avg_1m"] for h in summary["history"] if h.get("load_avg_1m") is not None]
    return {
        "num_experts": n,
        "bpb": {int(r["k"]): r["bpb"] for r in rows},
        "bpb_uniform": full.get("bpb_uniform"),
        "val_curve": curve,
        "best_val_bpb": min((c["bpb"] for c in curve), default=None),
        "final_val_bpb": curve[-1]["bpb"] if curve else None,
        "train_wall_s": summary["train_wall_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "history": [{"step": h["step"], "loss": h["loss"], "k": h["k"]} for h in summary["history"]],
        "load_avg_1m": statistics.fmean(loads) if loads else None,
    }


def collect(out: Path) -> dict:
    """method -> seed -> read_run(...), for every finished run under out/runs."""
    results: dict = {}
    for summary in sorted((out / "runs").glob("*/seed*/train_summary.json")):
        run = summary.parent
        results.setdefault(run.parent.name, {})[int(run.name.removeprefix("seed"))] = read_run(run)
    return results


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample std or None with fewer than 2 values, count)."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def compare(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b), its standard error, and whether it is larger than 2 standard errors."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    diff = ma - mb
    if sa is None or sb is None:
        return {"diff": diff, "se": None, "significant": False}
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    return {"diff": diff, "se": se, "significant": abs(diff) > 2 * se}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training time of the first validation at or below ``target`` bits per byte (None: never)."""
    return next((c["train_wall_s"] for c in curve if c["bpb"] <= target and c["train_wall_s"] is not None), None)


def summarise(results: dict) -> dict:
    """Per method: mean/std/n of bits per byte at every k, with 1/N weighting, best and final
    validation at k = N, the overfitting gap (final - best), training time and tokens/s."""
    table = {}
    for method, seeds in results.items():
        runs = list(seeds.values())
        ks = sorted({k for r in runs for k in r["bpb"]})
        table[method] = {
            "seeds": sorted(seeds),
            "bpb": {k: mean_std([r["bpb"].get(k) for r in runs]) for k in ks},
            "bpb_uniform": mean_std([r["bpb_uniform"] for r in runs]),
            "best_val_bpb": mean_std([r["best_val_bpb"] for r in runs]),
            "final_val_bpb": mean_std([r["final_val_bpb"] for r in runs]),
            "overfit_gap": mean_std(
                [r["final_val_bpb"] - r["best_val_bpb"] for r in runs if r["best_val_bpb"] is not None]
            ),
            "train_wall_s": mean_std([r["train_wall_s"] for r in runs]),
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs]),
            "load_avg_1m": mean_std([r["load_avg_1m"] for r in runs]),
        }
    return table


def _verdict(cmp: dict, lower_is_claimed: bool = True) -> str:
    if not cmp["significant"]:
        return "inconclusive"
    return "held" if (cmp["diff"] < 0) == lower_is_claimed else "not held"


def claims(results: dict) -> list[dict]:
    """The paper's claims that this experiment can test, SMoE-Dropout (linear) against dense.

    1. better than dense at full capacity (final bits per byte at k = N);
    2. self-slimmable (bits per byte fall at every doubling of k; k = N beats k = N/2);
    3. cheaper to train (training time for the same steps);
    4. less overfitting (the rise of validation loss from its best to the end);
    5. time to quality (training time until SMoE-Dropout's validation first reaches dense's final).
    """
    if SMOE not in results or DENSE not in results:
        return []
    smoe, dense = results[SMOE].values(), results[DENSE].values()
    n = next(iter(smoe))["num_experts"]
    out = []
    c = compare([r["bpb"][n] for r in smoe], [r["bpb"][n] for r in dense])
    out.append({"claim": f"1. better than dense at k = N = {n}", **c, "verdict": _verdict(c)})
    ks = sorted(next(iter(smoe))["bpb"])
    means = [statistics.fmean(r["bpb"][k] for r in smoe) for k in ks]
    c = compare([r["bpb"][n] for r in smoe], [r["bpb"][n // 2] for r in smoe])
    monotone = all(b < a for a, b in zip(means, means[1:]))
    verdict = "not held" if not monotone else _verdict(c)
    out.append({"claim": "2. self-slimmable: quality rises with every doubling of k", **c, "verdict": verdict})
    c = compare([r["train_wall_s"] for r in smoe], [r["train_wall_s"] for r in dense])
    out.append({"claim": "3. cheaper to train (training time, same steps)", **c, "verdict": _verdict(c)})
    gaps = [
        [r["final_val_bpb"] - r["best_val_bpb"] for r in rs if r["best_val_bpb"] is not None] for rs in (smoe, dense)
    ]
    c = compare(*gaps)
    out.append({"claim": "4. less overfitting (final - best validation, k = N)", **c, "verdict": _verdict(c)})
    target = statistics.fmean(r["final_val_bpb"] for r in dense)
    reached = [time_to_reach(r["val_curve"], target) for r in smoe]
    dense_wall = [r["train_wall_s"] for r in dense]
    if any(t is None for t in reached):
        verdict, c = "not held", {"diff": None, "se": None, "significant": False}
    else:
        c = compare(reached, dense_wall)
        verdict = _verdict(c)
    out.append(
        {
            "claim": "5. reaches dense's final validation in less training time",
            **c,
            "verdict": verdict,
            "smoe_times_s": reached,
            "dense_times_s": dense_wall,
            "target_bpb": target,
        }
    )
    return out


def _cell(stat: tuple, fmt: str = ".4f") -> str:
    mean, std, n = stat
    if n == 0:
        return ""
    return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def markdown_table(table: dict) -> str:
    ks = sorted({k for t in table.values() for k in t["bpb"]})
    head = [
        "method",
        "seeds",
        *(f"k={k}" for k in ks),
        "k=N, 1/N",
        "best val",
        "final val",
        "train (s)",
        "tokens/s",
        "load",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, t in table.items():
        cells = [method, ",".join(map(str, t["seeds"]))]
        cells += [_cell(t["bpb"][k]) if k in t["bpb"] else "" for k in ks]
        cells += [_cell(t["bpb_uniform"]), _cell(t["best_val_bpb"]), _cell(t["final_val_bpb"])]
        cells += [_cell(t["train_wall_s"], ".0f"), _cell(t["tokens_per_s"], ",.0f"), _cell(t["load_avg_1m"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(rows: list[dict]) -> str:
    lines = ["| claim | SMoE-Dropout - dense | 2 x std. error | verdict |", "|---|---|---|---|"]
    for r in rows:
        diff = "" if r["diff"] is None else f"{r['diff']:+.4f}"
        se = "n/a (one seed)" if r["se"] is None else f"{2 * r['se']:.4f}"
        lines.append(f"| {r['claim']} | {diff} | {se} | **{r['verdict']}** |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> list[Path]:
    """results.md, results.json and the plots; returns their paths."""
    table = summarise(results)
    verdicts = claims(results)
    md = out / "results.md"
    text = (
        "Validation bits per byte (lower is better) of each method at k active experts: mean ± sample "
        "standard deviation over its seeds. `k=N, 1/N` weights every expert equally at full capacity; "
        "`best val` and `final val` are the periodic validations at k = N (best over the run, and at "
        "the end); `train (s)` is the training time without validations and saves; `load` is the "
        "machine's mean 1-minute load average during training (about the number of ranks when the run had "
        "the cores to itself; more means other work shared them and its times are not comparable).\n\n"
        + markdown_table(table)
        + "\n"
    )
    if verdicts:
        text += (
            f"\nThe claims, `{SMOE}` against `{DENSE}` (a difference counts only when larger than twice "
            "its standard error):\n\n" + claims_table(verdicts) + "\n"
        )
    md.write_text(text)
    js = out / "results.json"
    js.write_text(json.dumps({"runs": results, "summary": table, "claims": verdicts}, indent=2) + "\n")
    return [md, js, *write_plots(results, table, out)]


def write_plots(results: dict, table: dict, out: Path) -> list[Path]:
    """self_slimming.png (mean ± std per k, every seed as a point), val_vs_time.png (validation at
    k = N against training time, every run) and loss_vs_step.png (training loss, seed 0's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, t) in enumerate(table.items()):
        color = f"C{i % 10}"
        ks = sorted(t["bpb"])
        if len(ks) == 1:  # dense: one width, a reference level
            ax.axhline(t["bpb"][ks[0]][0], linestyle="--", color="black", label=f"{method} (k = N)")
            continue
        ax.errorbar(
            ks,
            [t["bpb"][k][0] for k in ks],
            yerr=[t["bpb"][k][1] or 0 for k in ks],
            color=color,
            marker="o",
            capsize=3,
            label=method,
        )
        for run in results[method].values():
            ax.scatter(list(run["bpb"]), list(run["bpb"].values()), color=color, s=8, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active experts k at evaluation")
    ax.set_ylabel("validation bits per byte")
    paths.append(_save(fig, ax, out / "self_slimming.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, seeds) in enumerate(results.items()):
        for j, run in enumerate(seeds.values()):
            xs = [c["train_wall_s"] for c in run["val_curve"]]
            ax.plot(
                xs,
                [c["bpb"] for c in run["val_curve"]],
                color=f"C{i % 10}",
                alpha=0.8,
                label=method if j == 0 else None,
            )
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation bits per byte at k = N")
    paths.append(_save(fig, ax, out / "val_vs_time.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, seeds) in enumerate(results.items()):
        run = seeds[min(seeds)]
        ax.plot(
            [h["step"] for h in run["history"]],
            [h["loss"] / LN2 for h in run["history"]],
            color=f"C{i % 10}",
            label=method,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (bits per token)")
    paths.append(_save(fig, ax, out / "loss_vs_step.png"))
    return paths


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, found: dict, table: str, plot) -> None:
    """An experiment's ``results.json`` (``found``), ``results.md`` (``table``) and
    ``accuracy_vs_k.png`` (``plot(found, path)``), each announced on stdout."""
    (out / "results.json").write_text(json.dumps(found, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    plot(found, out / "accuracy_vs_k.png")
    for name in ("results.md", "results.json", "accuracy_vs_k.png"):
        print(f"wrote {out / name}")


def plot_against_k(ax, label: str, ks: list[int], values: list[float], color: str) -> None:
    """One model's figure against k on ``ax``: a line, or a dashed level for a model of one width."""
    if len(ks) == 1:
        ax.axhline(values[0], linestyle="--", color=color, label=f"{label} (one width)")
    else:
        ax.plot(ks, values, marker="o", color=color, label=label)


def finish_k_axes(ax, ylabel: str, title: str | None = None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active experts k at evaluation")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
