"""The self-slimming results: validation loss at k = 1, 2, 4, ..., N, their table, JSON and plot
(the decoder's with bits per byte, the encoder's with the masked tokens' accuracy).

The trainer (``smoe_ds.train``) and ``smoe_ds.evaluate`` sweep the built-in LM with
:func:`report`; the fine-tuner (``smoe_ds.finetune``) evaluates its task itself and prints
its rows with :func:`format_rows`. Both write ``self_slimming.json`` and ``self_slimming.png``
with :func:`write_results`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from smoe_ds.distributed import faults
from smoe_ds.distributed import process_group as D
from smoe_ds.models.lm import IGNORE
from smoe_ds.moe.layer import moe_layers, set_active_experts, uniform_full_capacity

LN2 = math.log(2.0)  # nats per bit


@torch.no_grad()
def summed_over_ranks(model, batches: list, k: int | None, figures) -> torch.Tensor:
    """The sums over every rank's ``batches`` of ``figures(model, x, y)`` (a list of floats per
    batch), at ``k`` active experts, in eval mode, fp64 [F].

    ``model`` is a DeepSpeed engine or a plain ``SMoELM``. Under a process group all ranks
    must call this together with the same number of batches: the MoE layers exchange tokens
    in every forward.
    """
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    was_training = model.training
    model.eval()
    if k is not None:
        set_active_experts(module, k)
    total = 0
    for x, y in batches:
        faults.maybe_die("eval", D.rank())
        total = total + torch.tensor(figures(model, x.to(device), y.to(device)), dtype=torch.float64)
    total = D.all_reduce_sum(total.to(device)).cpu()
    model.train(was_training)
    return total


def validation_loss(model, batches: list, k: int | None = None) -> float:
    """Mean next-token loss (nats) over every rank's ``batches`` [(x [B, T], y [B, T])] at ``k``
    active experts (see ``summed_over_ranks``)."""
    total = summed_over_ranks(model, batches, k, lambda m, x, y: [m(x, y).lm_loss.item(), 1.0])
    return float(total[0] / total[1])


def masked_lm_metrics(model, batches: list, k: int | None = None) -> dict:
    """The encoder's {"loss": mean cross-entropy (nats), "accuracy": share predicted right} over the
    masked tokens of every rank's ``batches`` [(inputs [B, T], labels [B, T], -100 = not scored)] at
    ``k`` active experts (see ``summed_over_ranks``)."""

    def figures(m, x, labels) -> list[float]:
        logits = m(x, labels).logits.float()  # [M, V]: the scored positions'
        scored = labels[labels != IGNORE]
        loss = torch.nn.functional.cross_entropy(logits, scored, reduction="sum")
        return [loss.item(), (logits.argmax(-1) == scored).sum().item(), scored.numel()]

    total = summed_over_ranks(model, batches, k, figures)
    return {"loss": float(total[0] / total[2]), "accuracy": float(total[1] / total[2])}


def next_token_metrics(bytes_per_token: float):
    """The decoder's measure for ``sweep``: {"loss" (nats/token), "bpb" (bits per UTF-8 byte)}."""

    def measure(model, batches: list, k: int) -> dict:
        loss = validation_loss(model, batches, k)
        return {"loss": loss, "bpb": loss / LN2 / bytes_per_token}

    return measure


def sweep(model, batches: list, ks: Iterable[int], measure) -> list[dict]:
    """One row per k: ``measure(model, batches, k)``'s figures and "tokens_per_s".

    tokens/s is the evaluation throughput over all ranks at that k: the compute side of the
    self-slimming trade-off. The k = N row of a softmax-routed model also has each figure again
    with the suffix "_uniform": every expert weighted 1/N instead of by the router's softmax, the
    paper's full-capacity evaluation (``smoe_ds.moe.layer.uniform_full_capacity``).
    """
    module = getattr(model, "module", model)
    n = next((layer.num_experts for layer in moe_layers(module)), None)
    tokens = D.world_size() * sum(x.numel() for x, _ in batches)
    rows = []
    for k in ks:
        measure(model, batches[:1], k)  # warm-up at this k, so the timing below is steady
        start = time.perf_counter()
        figures = measure(model, batches, k)
        rows.append({"k": k, **figures, "tokens_per_s": tokens / (time.perf_counter() - start)})
        if k == n:
            with uniform_full_capacity(module) as changed:
                if changed:
                    rows[-1].update({f"{key}_uniform": v for key, v in measure(model, batches, k).items()})
    return rows


def self_slimming_sweep(model, batches: list, ks: Iterable[int], bytes_per_token: float) -> list[dict]:
    """The decoder's sweep: one row per k, {"k", "loss" (nats/token), "bpb" (bits per UTF-8 byte),
    "tokens_per_s"}, and "loss_uniform", "bpb_uniform" at k = N (see ``sweep``)."""
    return sweep(model, batches, ks, next_token_metrics(bytes_per_token))


def format_table(rows: list[dict], title: str = "self-slimming evaluation") -> str:
    """The sweep's rows (:func:`self_slimming_sweep`) as a text table under ``title``."""
    second, header = ("bpb", "bits/byte") if "bpb" in rows[0] else ("accuracy", "accuracy")  # decoder, encoder
    lines = [
        title,
        f"{'k':>4}  {'val loss':>9}  {header:>9}  {'tokens/s':>9}",
        f"{'-' * 4}  {'-' * 9}  {'-' * 9}  {'-' * 9}",
    ]
    for r in rows:
        lines.append(f"{r['k']:>4}  {r['loss']:>9.4f}  {r[second]:>9.4f}  {r['tokens_per_s']:>9,.0f}")
        if "loss_uniform" in r:  # the same k = N, every expert weighted 1/N
            lines.append(f"{'1/N':>4}  {r['loss_uniform']:>9.4f}  {r[second + '_uniform']:>9.4f}  {'':>9}")
    if any("loss_uniform" in r for r in rows):
        lines.append("(1/N: k = N with every expert weighted equally, the paper's full-capacity evaluation)")
    return "\n".join(lines)


def format_rows(rows: list[dict], title: str) -> str:
    """Rows of any metrics per k (a fine-tuning task's) as a text table, one column per key."""
    keys = [key for key in rows[0] if key != "k"]
    lines = [title, "   k  " + "  ".join(f"{key:>14}" for key in keys)]
    for row in rows:
        cells = [f"{row[key]:>14,.1f}" if key.endswith("_per_s") else f"{row[key]:>14.4f}" for key in keys]
        lines.append(f"{row['k']:>4}  " + "  ".join(cells))
    return "\n".join(lines)


def write_results(
    rows: list[dict],
    out_dir: str | Path,
    meta: dict,
    metric: str = "bpb",
    ylabel: str = "validation bits per byte",
) -> tuple[Path, Path]:
    """Write ``self_slimming.json`` and a ``self_slimming.png`` plot of ``metric`` against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "self_slimming.json", out / "self_slimming.png"
    json_path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["k"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["k"] for r in rows], [str(r["k"]) for r in rows])
    ax.set_xlabel("active experts k at inference")
    ax.set_ylabel(ylabel)
    ax.set_title(meta.get("title", "self-slimming"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def report(
    engine, batches: list, ks: list[int], bytes_per_token: float, out_dir: str, meta: dict, masked: bool = False
) -> list[dict]:
    """Run the sweep on all ranks (``masked``: the encoder's, on masked batches); rank 0 prints the
    table and writes JSON and PNG."""
    measure = masked_lm_metrics if masked else next_token_metrics(bytes_per_token)
    rows = sweep(engine, batches, ks, measure)
    if D.is_main():
        print("\n" + format_table(rows, meta.get("title", "self-slimming evaluation")), flush=True)
        plot = {"metric": "accuracy", "ylabel": "validation accuracy on masked tokens"} if masked else {}
        json_path, png_path = write_results(rows, out_dir, meta, **plot)
        print(f"wrote {json_path} and {png_path}", flush=True)
    return rows
