"""What smoe-tune writes: every candidate in a table (Markdown and JSON), and the tuned config."""

from __future__ import annotations

import json
from pathlib import Path

from smoe_ds.tuning.candidates import Candidate
from smoe_ds.tuning.search import CONFIRM, Row, Search

STATUS_ORDER = {"timed": 0, "failed": 1, "not timed": 2, "pruned": 3, "invalid": 4}


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def _sorted_rows(rows: dict[Candidate, Row]) -> list[Row]:
    """Timed ones first, fastest first; then the rest by status and predicted memory."""

    def order(r: Row):
        speed = -(r.trial.tokens_per_s or 0.0) if r.trial else 0.0
        need = r.predicted.device if r.predicted else 0
        return (STATUS_ORDER[r.status], speed, need, r.candidate)

    return sorted(rows.values(), key=order)


def markdown(search: Search, tuned: Candidate, confirmed: bool, settings: dict, only_timed: bool = False) -> str:
    """The report; ``only_timed`` keeps the table to the timed and failed candidates and counts the
    rest (what smoe-tune prints)."""
    yours = search.rows[search.yours].trial
    base = yours.tokens_per_s if yours and yours.tokens_per_s else None
    lines = [
        f"# smoe-tune: {settings['config']} on {settings['ranks']} ranks",
        "",
        f"Memory budget {mib(settings['memory_budget_bytes'])} MiB per rank for the job's tensors; "
        f"time budget {settings['time_budget_s']:.0f} s; trials of {settings['trial_steps']} steps, "
        "tokens/s over the steps after warm-up.",
        "",
    ]
    lines += confirmation_lines(search, tuned, confirmed)
    lines += [
        "",
        "Predicted: model state (weights, fp32 masters, Adam moments; what the engine holds) and the "
        "whole need per rank (model state, gradients and buckets, activations, the expert exchange). "
        "Measured: the largest rank's model state, read from its engine, and its peak resident memory "
        "(which includes the process itself).",
        "",
        "| candidate | status | predicted state MiB | measured state MiB | predicted need MiB | peak RSS MiB "
        "| tokens/s | vs yours | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = _sorted_rows(search.rows)
    shown = [r for r in rows if r.trial is not None] if only_timed else rows
    for r in shown:
        t, p = r.trial, r.predicted
        speed = t.tokens_per_s if t else None
        mark = " (yours)" if r.candidate == search.yours else (" (tuned)" if r.candidate == tuned else "")
        lines.append(
            f"| {r.candidate.describe()}{mark} | {r.status} | {mib(p.model_state) if p else ''} "
            f"| {mib(t.model_state_bytes) if t else ''} | {mib(p.device) if p else ''} "
            f"| {mib(t.peak_rss_bytes) if t else ''} | {f'{speed:,.0f}' if speed else ''} "
            f"| {f'{speed / base:.2f}' if speed and base else ''} | {r.reason} |"
        )
    if len(shown) < len(rows):
        counts: dict[str, int] = {}
        for r in rows:
            if r.trial is None:
                counts[r.status] = counts.get(r.status, 0) + 1
        lines += ["", "Not timed: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + " (tune_report.md)."]
    return "\n".join(lines) + "\n"


def confirmation_lines(search: Search, tuned: Candidate, confirmed: bool) -> list[str]:
    """The verdict: the tuned candidate, and the back-to-back trials it was kept by."""
    if search.confirmation:
        yours, theirs = (search.confirmation[n].tokens_per_s for n in CONFIRM)
        ratio = f"{theirs / yours:.2f}x" if yours and theirs else "n/a"
        kept = "kept" if tuned != search.yours else "not kept: yours was as fast or faster"
        return [
            f"Tuned: **{tuned.describe()}**.",
            "",
            f"Back to back: your config {yours or 0:,.0f} tokens/s, the search's best "
            f"{theirs or 0:,.0f} tokens/s ({ratio}; {kept}).",
        ]
    if tuned == search.yours:
        return [f"Tuned: **{tuned.describe()}**, your config: no candidate timed faster."]
    note = "" if confirmed else " Not yet confirmed back to back against your config: run smoe-tune again to finish."
    return [f"Tuned: **{tuned.describe()}**.{note}"]


def as_json(search: Search, tuned: Candidate, confirmed: bool, settings: dict) -> dict:
    return {
        "settings": settings,
        "yours": search.yours.as_dict(),
        "tuned": tuned.as_dict(),
        "confirmed": confirmed,
        "stopped_early": search.stopped_early,
        "confirmation": {n: r.as_dict() for n, r in search.confirmation.items()},
        "candidates": [
            {
                "candidate": r.candidate.as_dict(),
                "name": r.candidate.key,
                "status": r.status,
                "reason": r.reason,
                "predicted": r.predicted.as_dict() if r.predicted else None,
                "measured": r.trial.as_dict() if r.trial else None,
            }
            for r in _sorted_rows(search.rows)
        ],
    }


def write(out: Path, search: Search, tuned: Candidate, confirmed: bool, settings: dict, tuned_raw: dict) -> Path:
    """Write ``tune_report.md``, ``tune_report.json`` and ``tuned_config.json`` into ``out``;
    returns the tuned config's path."""
    (out / "tune_report.md").write_text(markdown(search, tuned, confirmed, settings))
    report = as_json(search, tuned, confirmed, settings)
    (out / "tune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    path = out / "tuned_config.json"
    path.write_text(json.dumps(tuned_raw, indent=2) + "\n")
    return path
