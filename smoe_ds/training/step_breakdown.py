"""Where a training step's time goes: the phases of each step and the collectives inside them.

Turned on by ``run.step_breakdown`` (off by default, because it synchronises the device around
every phase and times every collective). A step is split into the phases below; inside each
phase, every collective that goes through ``deepspeed.comm`` is timed by DeepSpeed's comms
logger under its own name. That covers what DeepSpeed's engine runs (ZeRO's gradient
reduce-scatter or all-reduce, the parameter all-gather after the step, the expert-gradient
all-reduce) and the SMoE-Dropout dispatcher's collectives, which carry the names in
``smoe_ds.moe.dispatch.COLLECTIVES``. A phase's compute is its wall time less its collectives.

A collective's time is measured on each rank from call to return, so it includes the wait for
the slowest rank to arrive, not only the transfer: on a busy machine that wait is most of it.
Each rank keeps its own figures; ``summary()`` (collective) gathers them, and the summary gives
the mean over ranks with every rank's value beside it.

The first ``warmup_steps`` steps are not counted (allocator growth, first-call costs). The
step's wall time comes from the trainer's clock (validations and saves excluded), so
"other" (logging, the k schedule, the progress bar) is the step less its measured phases.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

PHASES = ("data", "forward", "loss check", "backward", "optimizer step")
"""The phases of one micro-batch, in order (``smoe_ds.training.loop_helpers.optimizer_step``)."""

OTHER = "other"


def _synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class StepBreakdown:
    """Per-phase and per-collective wall time of the measured training steps on this rank."""

    def __init__(self, enabled: bool = False, warmup_steps: int = 0) -> None:
        self.enabled = enabled
        self.warmup_steps = max(1, warmup_steps)  # the first step only starts the clock
        self.steps_seen = 0
        self._last_clock_s: float | None = None
        self._reset()
        if enabled:
            from deepspeed import comm

            comm.configure(enabled=True, prof_all=True, verbose=False)
            self._logger = comm.comms_logger

    def _reset(self) -> None:
        self.measured_steps = 0
        self.wall_s = 0.0
        self.phase_s: dict[str, float] = defaultdict(float)
        self.comm_s: dict[tuple[str, str], float] = defaultdict(float)  # (phase, collective) -> s
        self.comm_calls: dict[tuple[str, str], int] = defaultdict(int)
        self.comm_bytes: dict[tuple[str, str], int] = defaultdict(int)

    def _drain_collectives(self, phase: str) -> None:
        """Move what the comms logger recorded since the last drain into ``phase``'s account."""
        from deepspeed.comm.comm import timers

        for name, by_size in self._logger.comms_dict.items():
            logged_ms = 0.0
            for msg_size, (calls, latencies_ms, *_bandwidths) in by_size.items():
                logged_ms += sum(latencies_ms)
                self.comm_calls[phase, name] += calls
                self.comm_bytes[phase, name] += calls * msg_size
            # DeepSpeed 0.19.8 logs each call's latency as the running total of its timer, which it
            # never resets (``timed_op`` reads ``elapsed(reset=False)``), so the logged figures
            # are cumulative. The timer itself holds every call since its last reset: read and
            # reset it here. Should a later DeepSpeed reset it per call, it reads 0 and the
            # logged per-call latencies are right.
            timer_ms = timers(name).elapsed(reset=True)
            self.comm_s[phase, name] += (timer_ms or logged_ms) / 1000.0
        self._logger.reset_data()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name``; collectives recorded before it go to "other"."""
        if not self.enabled:
            yield
            return
        _synchronize()
        self._drain_collectives(OTHER)
        started = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.phase_s[name] += time.perf_counter() - started
            self._drain_collectives(name)

    def step_done(self, clock_s: float) -> None:
        """Close a step; ``clock_s`` is the trainer's training clock now (``TrainClock.elapsed_s``)."""
        if not self.enabled:
            return
        self._drain_collectives(OTHER)
        self.steps_seen += 1
        if self.steps_seen == self.warmup_steps:  # the warm-up ends here: count from the next step
            self._reset()
        elif self.steps_seen > self.warmup_steps and self._last_clock_s is not None:
            self.measured_steps += 1
            self.wall_s += clock_s - self._last_clock_s
        self._last_clock_s = clock_s

    def local(self) -> dict:
        """This rank's figures in ms per step: {"step": wall, phase: {"total", "compute", collective: ms}}."""
        n = max(self.measured_steps, 1)
        out = {"step": 1000.0 * self.wall_s / n, "phases": {}, "collectives": {}}
        phases = [*PHASES, OTHER]
        other_s = self.wall_s - sum(self.phase_s[p] for p in PHASES)
        for p in phases:
            total_s = other_s if p == OTHER else self.phase_s[p]
            comms = {op: s for (ph, op), s in self.comm_s.items() if ph == p}
            out["phases"][p] = {"total": 1000.0 * total_s / n, "compute": 1000.0 * (total_s - sum(comms.values())) / n}
            for op, s in comms.items():
                out["collectives"][f"{p}/{op}"] = {
                    "ms": 1000.0 * s / n,
                    "calls": self.comm_calls[p, op] / n,
                    "bytes": self.comm_bytes[p, op] / n,
                }
        return out

    def summary(self) -> dict | None:
        """Every rank's figures and their mean (collective: every rank calls it); None when off."""
        if not self.enabled:
            return None
        from smoe_ds.distributed import process_group as D

        ranks = D.all_gather_object(self.local())
        zero = {"ms": 0.0, "calls": 0.0, "bytes": 0.0}
        names = sorted({name for r in ranks for name in r["collectives"]})
        return {
            "measured_steps": self.measured_steps,
            "warmup_steps": self.warmup_steps,
            "step": _spread([r["step"] for r in ranks]),
            "phases": {
                p: {part: _spread([r["phases"][p][part] for r in ranks]) for part in ("total", "compute")}
                for p in (*PHASES, OTHER)
            },
            "collectives": {
                name: {
                    **_spread([r["collectives"].get(name, zero)["ms"] for r in ranks]),
                    "calls_per_step": _mean([r["collectives"].get(name, zero)["calls"] for r in ranks]),
                    "bytes_per_step": _mean([r["collectives"].get(name, zero)["bytes"] for r in ranks]),
                }
                for name in names
            },
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values_ms: list[float]) -> dict:
    """ms per step: the mean over ranks and every rank's value."""
    return {"ms": _mean(values_ms), "per_rank": values_ms}


def format_table(columns: dict[str, dict]) -> str:
    """A text table of one or more ``summary()`` results side by side (column title -> summary):
    ms per step for each phase, its compute and each of its collectives, then the step."""
    rows: list[tuple[str, list[float | None]]] = []
    names = sorted({name for summary in columns.values() for name in summary["collectives"]})
    for p in (*PHASES, OTHER):
        rows.append((p, [s["phases"][p]["total"]["ms"] for s in columns.values()]))
        inside = [n for n in names if n.startswith(p + "/")]
        if inside:
            rows.append(("  compute", [s["phases"][p]["compute"]["ms"] for s in columns.values()]))
        for n in inside:
            rows.append((f"  {n.split('/', 1)[1]}", [_collective_ms(s, n) for s in columns.values()]))
    rows.append(("step (wall)", [s["step"]["ms"] for s in columns.values()]))
    width = max(len(r[0]) for r in rows) + 2
    cols = [max(12, len(title) + 2) for title in columns]
    head = f"{'ms per step':<{width}}" + "".join(f"{title:>{w}}" for title, w in zip(columns, cols))
    lines = [head] + [
        f"{label:<{width}}" + "".join(f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}" for v, w in zip(values, cols))
        for label, values in rows
    ]
    return "\n".join(lines)


def _collective_ms(summary: dict, name: str) -> float | None:
    found = summary["collectives"].get(name)
    return found["ms"] if found else None
