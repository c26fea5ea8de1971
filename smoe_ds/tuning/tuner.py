"""smoe-tune's work, from arguments to report: load, enumerate, price, prune, search, write."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smoe_ds.config.schema import ConfigError, TrainConfig, apply_override, load_config
from smoe_ds.tuning import candidates as C
from smoe_ds.tuning import report
from smoe_ds.tuning.activations import saved_activation_bytes
from smoe_ds.tuning.memory_model import count_parameters, predict, vocab_size
from smoe_ds.tuning.search import Row, Search, mark_untimed, trial_folder
from smoe_ds.tuning.trials import read_trial, run_trial

UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6}
UNITS |= {"g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
# Inputs that change what a trial measures: a tuning folder holding trials of other inputs is refused.
TRIAL_INPUTS = ("config_sha256", "sets", "ranks", "trial_steps")


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"512 MiB"``, ``"2e9"``, ``"8G"`` -> bytes; ConfigError for anything else."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in UNITS:
        raise ConfigError(f"--memory-budget {text!r}: give bytes with an optional unit, e.g. 24GiB, 512MiB, 8G")
    return int(float(m[1]) * UNITS[m[2].lower()])


@dataclass
class Settings:
    config: str
    sets: list[str]
    ranks: int
    memory_budget_bytes: int
    time_budget_s: float
    trial_steps: int
    knobs: list[str]
    out: Path
    accelerator_is_host: bool

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "out"}
        d["out"] = str(self.out)
        d["config_sha256"] = hashlib.sha256(Path(self.config).read_bytes()).hexdigest()
        return d


def check_out_folder(s: Settings) -> None:
    """Create ``s.out``, or resume in it if it holds a tuning of the same inputs; refuse otherwise."""
    inputs = s.out / "tune_inputs.json"
    now = s.as_dict()
    if inputs.exists():
        before = json.loads(inputs.read_text())
        changed = [k for k in TRIAL_INPUTS if before.get(k) != now[k]]
        if changed:
            raise ConfigError(
                f"{s.out} holds a tuning of other inputs ({', '.join(changed)} differ); "
                "pass a new --out, or remove that folder to start over"
            )
    elif s.out.exists() and any(s.out.iterdir()):
        raise ConfigError(f"--out {s.out} holds files that are not a tuning; choose a new folder")
    s.out.mkdir(parents=True, exist_ok=True)
    inputs.write_text(json.dumps(now, indent=2) + "\n")


def price(s: Settings, raw: dict, cfg: TrainConfig) -> dict:
    """Every candidate as a report row: invalid, pruned (with the reason), or left to time."""
    rows: dict = {}
    counts: dict[int, object] = {}
    activations: dict[int, int] = {}
    vocab = vocab_size(cfg)
    for c in C.enumerate_candidates(cfg, s.ranks):
        c_raw = C.apply(raw, cfg, c, s.accelerator_is_host)
        try:
            c_cfg = C.load_candidate(c_raw, s.ranks)
        except ConfigError as e:
            rows[c] = Row(c, "invalid", str(e))
            continue
        c_cfg.model.vocab_size = vocab
        if c.ep_size not in counts:
            counts[c.ep_size] = count_parameters(c_cfg)
        if c.micro_batch not in activations:
            activations[c.micro_batch] = saved_activation_bytes(c_cfg, c.micro_batch)
        need = predict(c_cfg, s.ranks, counts[c.ep_size], activations[c.micro_batch], s.accelerator_is_host)
        rows[c] = Row(c, "not timed", predicted=need)
        if c.offload and s.accelerator_is_host:
            rows[c].status = "pruned"
            rows[
                c
            ].reason = "offload frees nothing here: the accelerator is the CPU, whose memory the state would move to"
        elif need.device > s.memory_budget_bytes:
            rows[c].status = "pruned"
            rows[c].reason = f"needs {report.mib(need.device)} MiB per rank, over the budget"
    return rows


def refuse_if_nothing_fits(s: Settings, rows: dict) -> None:
    priced = [r for r in rows.values() if r.predicted is not None]
    if not priced:
        first = next(iter(rows.values()))
        raise ConfigError(f"no candidate is a valid config: {first.reason}")
    if any(r.status == "not timed" for r in rows.values()):
        return
    smallest = min(priced, key=lambda r: r.predicted.device)
    raise ConfigError(
        f"no candidate fits --memory-budget {report.mib(s.memory_budget_bytes)} MiB per rank: the smallest need is "
        f"{report.mib(smallest.predicted.device)} MiB ({smallest.candidate.describe()})"
    )


def tune(s: Settings) -> Path:
    """Run the whole tuning; returns the tuned config's path."""
    from tqdm import tqdm

    deadline = time.monotonic() + s.time_budget_s
    raw = json.loads(Path(s.config).read_text())
    for item in s.sets:
        apply_override(raw, item)
    cfg = load_config(s.config, s.sets)
    cfg.validate_for_world(s.ranks)
    check_out_folder(s)
    print(f"smoe-tune: pricing the candidates of {s.config} on {s.ranks} ranks", flush=True)
    rows = price(s, raw, cfg)
    refuse_if_nothing_fits(s, rows)
    yours = C.of_config(cfg, s.ranks)
    tokens_per_step = yours.micro_batch * yours.grad_accum * s.ranks * cfg.model.block_size  # every candidate's

    def trial(name: str, c: C.Candidate, hang_s: float | None):
        c_raw = C.apply(raw, cfg, c, s.accelerator_is_host)
        bar.set_description(f"smoe-tune {name}")
        loaded = C.load_candidate(c_raw, s.ranks)
        budget_left = deadline - time.monotonic()
        folder = trial_folder(s.out, name)
        return run_trial(folder, c_raw, loaded, s.ranks, s.trial_steps, tokens_per_step, budget_left, hang_s)

    search = Search(
        rows,
        yours=yours,
        run_trial=trial,
        read_trial=lambda name: read_trial(trial_folder(s.out, name)),
        deadline=deadline,
    )
    bar = tqdm(total=search.planned(s.knobs), unit="trial", file=sys.stderr, dynamic_ncols=True)

    def done(name: str, result) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{name}: {result.tokens_per_s or 0:,.0f} tok/s" if not result.error else f"{name}: failed")

    search.on_trial_done = done
    tuned = search.run(s.knobs)
    bar.total = bar.n  # the plan was an estimate: a stage that moves the start changes the next one's
    bar.close()
    confirmed = bool(search.confirmation) or tuned == search.yours
    mark_untimed(rows)
    tuned_raw = C.apply(raw, cfg, tuned, s.accelerator_is_host)
    tuned_raw.setdefault("run", {})["out_dir"] = f"{cfg.run.out_dir.rstrip('/')}_tuned"
    path = report.write(s.out, search, tuned, confirmed, s.as_dict(), tuned_raw)
    print(report.markdown(search, tuned, confirmed, s.as_dict(), only_timed=True), flush=True)
    if search.stopped_early:
        print(f"smoe-tune: the time budget ran out; run the same command again to go on ({s.out})", flush=True)
    print(f"smoe-tune: wrote {path}, {s.out / 'tune_report.md'} and {s.out / 'tune_report.json'}", flush=True)
    return path
