"""k schedules: how many experts are active at a given global step.

Every schedule is a pure function of the global optimizer step, so a resumed run
recomputes k from its step counter and nothing about k needs to be checkpointed.

With p = clip((step - start_step) / (end_step - start_step), 0, 1):

- ``linear``      k = round((k_max - k_min) * p) + k_min         (the released SMoE-Dropout code)
- ``cosine``      k = round(k_min + (k_max - k_min) * (1 - cos(pi * p)) / 2)
- ``exponential`` k = round(k_min * (k_max / k_min) ** p)        (geometric growth)
- ``multistep``   k jumps at each milestone step; after the i-th of m milestones
                  k = round(k_min + (k_max - k_min) * i / m). Without milestones, four evenly
                  spaced ones in (start_step, end_step] are used.

The result is always clipped to [k_min, k_max].
"""

from __future__ import annotations

import bisect
import math

from smoe_ds.config.schema import KScheduleConfig, TrainConfig


def _progress(step: int, start: int, end: int) -> float:
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def _linear(p: float, lo: int, hi: int) -> float:
    return (hi - lo) * p + lo


def _cosine(p: float, lo: int, hi: int) -> float:
    return lo + (hi - lo) * (1.0 - math.cos(math.pi * p)) / 2.0


def _exponential(p: float, lo: int, hi: int) -> float:
    return lo * (hi / lo) ** p


_CURVES = {"linear": _linear, "cosine": _cosine, "exponential": _exponential}


def default_milestones(start: int, end: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced steps in (start, end]; the last is ``end``."""
    return [start + math.ceil((end - start) * i / count) for i in range(1, count + 1)]


def k_at_step(cfg: KScheduleConfig, step: int) -> int:
    """Number of active experts at global step ``step`` (0-based), in [k_min, k_max]."""
    lo, hi = cfg.k_min, cfg.k_max
    if cfg.kind == "multistep":
        milestones = cfg.milestones or default_milestones(cfg.start_step, cfg.end_step)
        passed = bisect.bisect_right(milestones, step)
        k = round(lo + (hi - lo) * passed / len(milestones))
    else:
        k = round(_CURVES[cfg.kind](_progress(step, cfg.start_step, cfg.end_step), lo, hi))
    return int(min(max(k, lo), hi))


def active_k(cfg: TrainConfig, step: int) -> int:
    """k for this step: the schedule for SMoE-Dropout, fixed (moe.k, or N for dense) otherwise."""
    if cfg.moe.mode == "smoe_dropout":
        return k_at_step(cfg.moe.k_schedule, step)
    return cfg.fixed_k()
