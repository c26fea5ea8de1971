"""The paper's transfer claim tested its way (issue 34): pretrain an encoder densely and with
SMoE-Dropout at equal parameters and steps, then fine-tune each densely on math word problems and
SST-2, and compare.

    python -m smoe_ds.experiments.encoder_transfer --out DIR [--data ../shared/data] [--scale cpu|tiny]
        [--sets asdiv-a,mawps,svamp,sst2] [--folds 0,1,2,3,4] [--seeds 0,1] [--variants V,...] [--ranks R]
    python -m smoe_ds.experiments.encoder_transfer --out DIR --report-only

Stages, in order, each unit of work writing its own result file so that the same command, rerun,
skips what is done and resumes what is not (a pretraining run from its last checkpoint):

1. ``DIR/corpus.txt``: the pretraining text, SST-2's training sentences (those also in its dev file
   left out) and tinyshakespeare. It holds no math word problem: every ASDiv-A and MAWPS problem is
   in some fold's test split and SVAMP is a test set, so none may be pretrained on.
2. ``DIR/pretrain/{dense,smoe_dropout}``: ``smoe_ds.train`` with model.objective masked_lm
   (``ds_configs/cpu_tiny_mlm.json`` and the scale's overrides: AdamW, linear decay to 0, k from N/2
   to N, the routers at std 0.02), the same steps, data and seed for both; then ``export/``.
3. ``DIR/runs/SET/FOLD/VARIANT/seedS``: ``smoe_ds.finetune`` of each export, every weight trained
   at a fixed k ("dense fine-tuning" in the paper): the dense encoder at its one width, the
   SMoE-Dropout encoder at k = N and at k = N/2. ASDiv-A and MAWPS run their 5 folds, SVAMP trains on
   MAWPS + ASDiv-A, SST-2 trains on train.tsv and is scored on dev.tsv.
4. ``DIR/results.md`` (each variant's mean accuracy per data set, the gains over the dense encoder
   paired by fold and seed with twice their standard error, against the paper's gains),
   ``results.json`` and ``accuracy_vs_k.png`` (each variant's mean accuracy per data set), rewritten
   after every fine-tune, so a run stopped part way leaves the results it has; ``--report-only``
   writes them from the fine-tunes finished so far and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from smoe_ds.config.schema import apply_override
from smoe_ds.experiments.mwp import PAPER_GAIN, count_rows, splits
from smoe_ds.experiments.paper import add_ranks_option, parse_seeds, ranks_per_node, train_method
from smoe_ds.experiments.report import mean_std, write_outputs

REPO = Path(__file__).resolve().parents[2]
PRETRAIN_CONFIG = REPO / "ds_configs" / "cpu_tiny_mlm.json"
FINETUNE_CONFIGS = {
    "mwp": REPO / "ds_configs" / "finetune_minilm_mwp.json",
    "sst2": REPO / "ds_configs" / "finetune_minilm_sst2.json",
}
SETS = ("asdiv-a", "mawps", "svamp", "sst2")
ENCODERS = ("dense", "smoe_dropout")

# What each scale changes in the configs: "pretrain" overrides ds_configs/cpu_tiny_mlm.json, "finetune"
# every fine-tune's config; "mwp_epochs" and "sst2_epochs" set the fine-tunes' steps. docs/results/
# encoder_transfer/README.md says why "cpu" is what it is.
SCALES = {
    "cpu": {
        "pretrain": [
            "model.d_model=128",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.block_size=128",
            "model.dropout=0.1",
            "moe.num_experts=8",
            "moe.d_expert=64",
            "run.max_steps=1500",  # 6.6 passes over the corpus's 7,255 blocks at 32 a step
            "run.save_interval=100",
            "run.eval_interval=250",
            "train_micro_batch_size_per_gpu=16",
            "scheduler.params.warmup_num_steps=150",
            "scheduler.params.warmup_max_lr=0.001",
        ],
        "finetune": ["optimizer.params.lr=0.0002", "run.save_interval=200", "run.log_interval=50"],
        # A scratch encoder this small needs more than MiniLM's 4 epochs at 2e-4: the dense encoder's
        # ASDiv-A fold-0 value accuracy was 22.3 % there (the most common equation's 22.3 %), 32.4 % at
        # 8 epochs and 1e-3, 42.4 % at 16 and 2e-4, 51.3 % at 16 and 1e-3 (docs/results/encoder_transfer).
        "finetune_mwp": ["optimizer.params.lr=0.001"],
        "mwp_epochs": 16,
        "sst2_epochs": 0.25,
        "max_length": {"mwp": 96, "sst2": 64},
    },
    "tiny": {  # the smoke test's: every stage runs, nothing is learnt
        "pretrain": [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.block_size=64",
            "moe.num_experts=4",
            "moe.d_expert=16",
            "run.max_steps=3",
            "run.eval_interval=0",
            "run.final_eval_batches=1",
            "data.val_fraction=0.3",  # the fixtures hold a few hundred sentences
            "run.log_interval=1",
            "train_micro_batch_size_per_gpu=4",
            "scheduler.params.warmup_num_steps=1",
        ],
        "finetune": [
            "train_micro_batch_size_per_gpu=4",
            "scheduler.params.warmup_num_steps=1",
            "run.log_interval=1",
        ],
        "mwp_epochs": 1,
        "sst2_epochs": 0.05,
        "max_length": {"mwp": 64, "sst2": 32},
    },
}


def build_corpus(data: Path, out: Path) -> Path:
    """``out``: SST-2's training sentences that are not in its dev file, then tinyshakespeare; one
    document per paragraph. Kept on a rerun, so that every run trains on the same text."""
    if out.is_file():
        return out
    dev = {line.split("\t")[0].strip() for line in _rows(data / "sst2" / "dev.tsv")}
    sentences = [s for line in _rows(data / "sst2" / "train.tsv") if (s := line.split("\t")[0].strip()) not in dev]
    parts = ["\n".join(sentences[i : i + 20]) for i in range(0, len(sentences), 20)]  # 20 sentences a paragraph
    shakespeare = data / "tinyshakespeare" / "input.txt"
    if shakespeare.is_file():
        parts.append(shakespeare.read_text(encoding="utf-8"))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"corpus: {len(sentences):,} SST-2 training sentences and tinyshakespeare -> {out}", flush=True)
    return out


def _rows(path: Path) -> list[str]:
    """A TSV file's rows after its header; a missing file is a clear error."""
    if not path.is_file():
        raise SystemExit(f"smoe-ds: error: {path} not found (expected ../shared/data's layout under --data)")
    return path.read_text(encoding="utf-8").splitlines()[1:]


def pretrain(encoder: str, scale: dict, corpus: Path, tokenizer: str, out: Path, ranks: int) -> Path:
    """Pretrain (or resume) one encoder and export it; returns the export's folder."""
    from smoe_ds.checkpoint.export import convert

    run_dir = out / "pretrain" / encoder
    export = run_dir / "export"
    if (export / "config.json").is_file():
        print(f"pretrain {encoder}: done already, skipped", flush=True)
        return export
    raw = json.loads(PRETRAIN_CONFIG.read_text())
    sets = [*scale["pretrain"], f"moe.mode={encoder}", f"run.out_dir={run_dir}"]
    sets += [f"data.path={corpus}", f"data.tokenizer={tokenizer}"]
    for item in sets:
        apply_override(raw, item)
    n = raw["moe"]["num_experts"]
    raw["moe"]["k_schedule"].update(k_min=n // 2, k_max=n)  # the paper's N/2 -> N, whatever the scale's N
    raw["moe"]["ep_size"] = min(ranks, n)
    if encoder == "dense":
        raw["run"]["eval_ks"] = [n]
    config_path = out / "configs" / f"pretrain_{encoder}.json"
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
    if not (run_dir / "train_summary.json").is_file():
        print(f"pretrain {encoder}: {raw['run']['max_steps']} steps (resumes from its last checkpoint)", flush=True)
        train_method(f"pretrain/{encoder}", config_path, run_dir, ranks)
    convert(run_dir / "checkpoints", export)
    return export


def variants(num_experts: int) -> dict[str, tuple[str, int]]:
    """Fine-tuning variant -> (the encoder it starts from, its fixed k)."""
    return {
        "dense": ("dense", num_experts),
        f"smoe_dropout_k{num_experts}": ("smoe_dropout", num_experts),
        f"smoe_dropout_k{num_experts // 2}": ("smoe_dropout", num_experts // 2),
    }


def finetune_config(
    task: str, encoder: str, k: int, export: Path, train: Path, dev: Path, run_dir: Path, seed: int, ranks: int, scale
) -> dict:
    """One fine-tune's config: the task's shipped config, the export, a fixed k, the split and seed."""
    raw = json.loads(FINETUNE_CONFIGS[task].read_text())
    n = json.loads((export / "config.json").read_text())["moe"]["num_experts"]
    raw["hf"].update(model=str(export), max_length=scale["max_length"][task])
    raw["moe"].update(mode=encoder, num_experts=n, k_schedule={"kind": "linear", "k_min": k, "k_max": k})
    raw["moe"]["ep_size"] = min(ranks, n) if encoder == "smoe_dropout" else 1
    raw["data"].update(path=str(train), validation=str(dev), seed=seed)
    raw["run"].update(out_dir=str(run_dir), seed=seed, eval_ks=[k])
    raw["moe"]["router_seed"] = 1234  # the export's routers are used; this only names the default
    for item in scale["finetune"] + scale.get(f"finetune_{task}", []):
        apply_override(raw, item)
    epochs = scale["mwp_epochs" if task == "mwp" else "sst2_epochs"]
    batch = raw["train_micro_batch_size_per_gpu"] * raw.get("gradient_accumulation_steps", 1) * ranks
    raw["run"]["max_steps"] = max(1, math.ceil(epochs * count_rows(train) / batch))
    return raw


def all_splits(data: Path, names: list[str], folds: list[int]) -> list[tuple[str, str, str, Path, Path]]:
    """(set, task, fold label, train file, dev file) of every requested split."""
    out = []
    for name in names:
        if name == "sst2":
            _rows(data / "sst2" / "dev.tsv")  # a clear error now, not after pretraining
            out.append((name, "sst2", "all", data / "sst2" / "train.tsv", data / "sst2" / "dev.tsv"))
        else:
            out += [(name, "mwp", fold, train, dev) for fold, train, dev in splits(data / "mwp", name, folds)]
    return out


def collect(out: Path) -> dict:
    """set -> variant -> [{"fold", "seed", "accuracy" (%)}] for every finished fine-tune."""
    found: dict = {}
    for summary in sorted((out / "runs").glob("*/*/*/seed*/train_summary.json")):
        run = summary.parent
        (row,) = json.loads(summary.read_text())["self_slimming"]  # one k per run
        accuracy = row["value_accuracy"] if "value_accuracy" in row else row["accuracy"]
        entry = {"fold": run.parts[-3], "seed": int(run.name.removeprefix("seed")), "accuracy": 100.0 * accuracy}
        found.setdefault(run.parts[-4], {}).setdefault(run.parts[-2], []).append(entry)
    return found


def paired_gain(smoe: list[dict], dense: list[dict]) -> tuple[float, float | None, int]:
    """Mean of (SMoE - dense) over the (fold, seed) pairs both have, its standard error (None with one
    pair) and the pair count."""
    base = {(r["fold"], r["seed"]): r["accuracy"] for r in dense}
    diffs = [r["accuracy"] - base[(r["fold"], r["seed"])] for r in smoe if (r["fold"], r["seed"]) in base]
    if not diffs:
        return math.nan, None, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se, len(diffs)


MIN_PAIRS_FOR_VERDICT = 3  # two pairs give a standard error from one degree of freedom: no basis for one


def _gain_cell(gain: tuple[float, float | None, int]) -> str:
    """The gain as the table shows it: mean ± 2 SE and a verdict, beyond ±2 SE only, and only from
    at least MIN_PAIRS_FOR_VERDICT pairs."""
    mean, se, n = gain
    if n == 0:
        return ""
    if se is None:
        return f"{mean:+.2f} (1 pair: no verdict)"
    if n < MIN_PAIRS_FOR_VERDICT:
        return f"{mean:+.2f} ± {2 * se:.2f} ({n} pairs: too few for a verdict)"
    verdict = "SMoE better" if mean > 2 * se else "dense better" if mean < -2 * se else "inconclusive"
    return f"{mean:+.2f} ± {2 * se:.2f}: {verdict}"


def prior_only_accuracy(task: str, train: Path, dev: Path) -> float:
    """Accuracy (%) on ``dev`` of always giving ``train``'s most common answer: the most common
    equation, scored by value as the fine-tunes are, or SST-2's most common label. A fine-tune near
    it has learned the answers' prior and little from the questions."""
    if task == "mwp":
        from smoe_ds.finetuning.mwp_data import is_correct, read_problems

        common = Counter(p.equation for p in read_problems(train)).most_common(1)[0][0]
        return 100.0 * statistics.fmean(is_correct(common, p) for p in read_problems(dev))
    label = Counter(row.rsplit("\t", 1)[-1].strip() for row in _rows(train)).most_common(1)[0][0]
    return 100.0 * statistics.fmean(row.rsplit("\t", 1)[-1].strip() == label for row in _rows(dev))


def prior_only(todo: list[tuple[str, str, str, Path, Path]]) -> dict[tuple[str, str], float]:
    """(set, fold) -> ``prior_only_accuracy`` of every split in ``todo``."""
    return {(name, fold): prior_only_accuracy(task, train, dev) for name, task, fold, train, dev in todo}


def _prior_cell(prior: dict[tuple[str, str], float], name: str, runs: dict) -> str:
    """The prior-only accuracy averaged over the folds that ``runs`` (variant -> rows) reached."""
    values = [
        prior[(name, f)] for f in sorted({r["fold"] for rows in runs.values() for r in rows}) if (name, f) in prior
    ]
    return f"{statistics.fmean(values):.1f}" if values else ""


def results_table(found: dict, pretrained: dict, prior: dict[tuple[str, str], float] | None = None) -> str:
    names = [n for n in SETS if n in found]
    variant_names = sorted({v for n in names for v in found[n]}, key=lambda v: (v != "dense", -len(v), v))
    smoe = [v for v in variant_names if v != "dense"]
    lines = [
        "Accuracy (%) after dense fine-tuning (every weight trained, k fixed), mean ± sd over folds and seeds: "
        "value accuracy on each math set's test folds, accuracy on SST-2's dev file. A gain is SMoE - dense "
        "paired by fold and seed, ± twice its standard error; it counts only beyond that, and only from "
        f"{MIN_PAIRS_FOR_VERDICT} pairs or more. Prior only: always "
        "the training file's most common equation (or label), for scale.",
        "",
        "| data set | prior only | " + " | ".join(variant_names) + " | " + " | ".join(f"gain of {v}" for v in smoe),
    ]
    prior = prior or {}
    lines[-1] += " | paper's gain |"
    lines.append("|---" * (3 + len(variant_names) + len(smoe)) + "|")
    for name in names:
        cells = []
        for v in variant_names:
            values = [r["accuracy"] for r in found[name].get(v, [])]
            cells.append(_mean_sd(values))
        gains = [_gain_cell(paired_gain(found[name].get(v, []), found[name].get("dense", []))) for v in smoe]
        paper = f"+{PAPER_GAIN[name]:.2f}" if name in PAPER_GAIN else "not reported for BERT"
        lines.append(
            f"| {name} | {_prior_cell(prior, name, found[name])} | " + " | ".join(cells + gains) + f" | {paper} |"
        )
    lines += ["", "Pretraining (validation on the corpus's held-out text, masked tokens):", ""]
    lines += ["| encoder | k | MLM loss | MLM accuracy |", "|---|---|---|---|"]
    for encoder, rows in pretrained.items():
        lines += [f"| {encoder} | {r['k']} | {r['loss']:.4f} | {r['accuracy']:.4f} |" for r in rows]
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd (n=N)``, without the sd for one value, empty for none."""
    if not values:
        return ""
    mean, sd, n = mean_std(values)
    return f"{mean:.1f}" + ("" if sd is None else f" ± {sd:.1f}") + f" (n={n})"


def write_plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETS if n in found]
    variant_names = sorted({v for n in names for v in found[n]}, key=lambda v: (v != "dense", -len(v), v))
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * max(1, len(names)), 3.6))
    width = 0.8 / max(1, len(variant_names))
    for i, v in enumerate(variant_names):
        means = [statistics.fmean([r["accuracy"] for r in found[n].get(v, [])] or [math.nan]) for n in names]
        ax.bar([j + i * width for j in range(len(names))], means, width, label=v, color=f"C{i}")
    ax.set_xticks([j + width * (len(variant_names) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrained_rows(out: Path) -> dict:
    """encoder -> its pretraining's self-slimming rows, for every finished pretraining."""
    found = {}
    for encoder in ENCODERS:
        path = out / "pretrain" / encoder / "self_slimming.json"
        if path.is_file():
            found[encoder] = json.loads(path.read_text())["results"]
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m smoe_ds.experiments.encoder_transfer", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the folder with mwp/, sst2/")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of data sets")
    p.add_argument("--folds", default="0,1,2,3,4", help="folds of the cross-validated sets")
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds")
    p.add_argument(
        "--variants", default=None, help="fine-tuning variants to run (default: all, e.g. dense,smoe_dropout_k8)"
    )
    p.add_argument("--report-only", action="store_true", help="write the results of the finished runs; run nothing")
    add_ranks_option(p)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        p.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(SETS)}")
    if not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder")
    seeds, folds = parse_seeds(args.seeds), parse_seeds(args.folds)
    out = args.out.absolute()
    todo = all_splits(args.data.absolute(), names, folds)  # a missing file is a clear error before anything runs
    if args.report_only:
        report(out, todo)
        return 0
    from smoe_ds.hf.local_models import minilm_dir

    scale = SCALES[args.scale]
    ranks = args.ranks or ranks_per_node()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    corpus = build_corpus(args.data.absolute(), out / "corpus.txt")
    exports = {encoder: pretrain(encoder, scale, corpus, str(minilm_dir()), out, ranks) for encoder in ENCODERS}
    n = json.loads((exports["smoe_dropout"] / "config.json").read_text())["moe"]["num_experts"]
    chosen = list(variants(n)) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    if set(chosen) - set(variants(n)):
        p.error(f"unknown variant in --variants {args.variants!r}; choose from {', '.join(variants(n))}")
    runs = [(s, seed, v) for s in todo for seed in seeds for v in chosen]
    for i, ((name, task, fold, train, dev), seed, variant) in enumerate(runs, 1):
        run_dir = out / "runs" / name / fold / variant / f"seed{seed}"
        label = f"[{i}/{len(runs)}, {time.time() - start:.0f}s] {name} {fold}: {variant} seed {seed}"
        encoder, k = variants(n)[variant]
        config = finetune_config(task, encoder, k, exports[encoder], train, dev, run_dir, seed, ranks, scale)
        config_path = out / "configs" / f"{name}_{fold}_{variant}_seed{seed}.json"
        if (run_dir / "train_summary.json").is_file():
            check_same_config(config_path, config, run_dir)
            print(f"{label}: done already, skipped", flush=True)
            continue
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"{label}: {config['run']['max_steps']} steps", flush=True)
        train_method(f"{name}/{fold}/{variant}/{seed}", config_path, run_dir, ranks, module="smoe_ds.finetune")
        # Checkpoints only resume an unfinished fine-tune (144 MB each at the cpu scale); the result,
        # the model and the log stay.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        report(out, todo)
    report(out, todo)
    return 0


def check_same_config(path: Path, config: dict, run_dir: Path) -> None:
    """A finished run counts only if the config it ran (``path``) is the one this command would run."""
    ran = json.loads(path.read_text()) if path.is_file() else None
    if ran != config:
        differ = sorted(_differences(ran or {}, config))
        raise SystemExit(
            f"smoe-ds: error: {run_dir} was fine-tuned with another config (differs in "
            f"{', '.join(differ[:4]) or 'its recorded config, which is missing'}); move it away to run it again"
        )


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def report(out: Path, todo: list[tuple[str, str, str, Path, Path]]) -> None:
    """results.md, results.json and the plot from every fine-tune finished in ``out`` so far, with the
    prior-only accuracy of the splits in ``todo``."""
    if not (out / "runs").is_dir():
        raise SystemExit(f"{out}: no fine-tune has run yet (no runs/ folder)")
    found = collect(out)
    write_outputs(out, found, results_table(found, pretrained_rows(out), prior_only(todo)), write_plot)


if __name__ == "__main__":
    sys.exit(main())
