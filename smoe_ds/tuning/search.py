"""The order smoe-tune times candidates in, within a time budget, resuming where it stopped.

Every candidate is first checked (the config takes it: ``invalid`` if not) and priced by the
memory model (``pruned`` when it needs more than the budget, or offloads where the accelerator
is the CPU and offload frees nothing). Timing every survivor would take far longer than a tuning
budget allows (each is a launch of its own), so the survivors are searched one knob at a time:
from the user's config (or, if it does not fit, the surviving candidate nearest to it), time each
candidate that differs in the micro-batch only and keep the fastest, then likewise for expert
parallelism (ep_size with its exchange), the ZeRO stage and offload. Last, the user's config and
the winner run again back to back, and the winner is kept only if it is at least as fast there:
the tuned config is never slower than the user's in the same sitting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smoe_ds.tuning.candidates import KNOBS, Candidate
from smoe_ds.tuning.memory_model import MemoryPrediction
from smoe_ds.tuning.trials import OutOfTime, TrialResult

CONFIRM = ("confirm-yours", "confirm-tuned")  # the back-to-back trials' names


@dataclass
class Row:
    """One candidate in the report."""

    candidate: Candidate
    status: str  # "timed", "failed", "pruned", "invalid" or "not timed"
    reason: str = ""  # why pruned, invalid, failed or not timed
    predicted: MemoryPrediction | None = None
    trial: TrialResult | None = None


@dataclass
class Search:
    """The state of one tuning: its rows by candidate, and the trials still allowed by the budget.

    ``run_trial(name, candidate, hang_s)`` runs one trial (stopped as failed after ``hang_s``, or
    raising OutOfTime at the deadline); ``read_trial(name)`` reads back the result an earlier
    sitting left (None if there is none). ``deadline`` is the ``time.monotonic()`` after which no
    trial starts (one that would run past it does not start either).
    """

    rows: dict[Candidate, Row]
    yours: Candidate
    run_trial: Callable[[str, Candidate, float | None], TrialResult]
    read_trial: Callable[[str], TrialResult | None]
    deadline: float
    on_trial_done: Callable[[str, TrialResult], None] = lambda name, result: None
    confirmation: dict[str, TrialResult] = field(default_factory=dict)
    stopped_early: bool = False
    trial_walls_s: list[float] = field(default_factory=list)

    def survivors(self) -> list[Candidate]:
        return [c for c, r in self.rows.items() if r.status not in ("pruned", "invalid")]

    def start(self) -> Candidate:
        """The user's config if it fits, else the surviving candidate with the fewest knobs changed
        (then the least predicted memory)."""
        alive = self.survivors()
        if self.yours in alive:
            return self.yours
        need = lambda c: self.rows[c].predicted.device if self.rows[c].predicted else 0  # noqa: E731
        return min(alive, key=lambda c: (c.differs_from(self.yours), need(c), c))

    def neighbours(self, best: Candidate, stage: str) -> list[Candidate]:
        """Surviving candidates that differ from ``best`` in ``stage``'s knob only."""
        others = [s for s in KNOBS if s != stage]  # one stage of the search per knob
        return [
            c
            for c in self.survivors()
            if all(KNOBS[s](c) == KNOBS[s](best) for s in others) and KNOBS[stage](c) != KNOBS[stage](best)
        ]

    def planned(self, stages: list[str]) -> int:
        """Trials the search would run if each stage kept its start: the progress bar's total."""
        start = self.start()
        return 1 + sum(len(self.neighbours(start, s)) for s in stages) + len(CONFIRM)

    def run(self, stages: list[str]) -> Candidate:
        """Search ``stages`` in order, then confirm; returns the tuned candidate."""
        best = self.start()
        if not self._time(best):
            return best
        for stage in stages:
            for c in self.neighbours(best, stage):
                if not self._time(c):
                    return self._confirm(best)
                if self._faster(c, best):
                    best = c
        return self._confirm(best)

    def _faster(self, a: Candidate, b: Candidate) -> bool:
        ta, tb = self.rows[a].trial, self.rows[b].trial
        return ta.tokens_per_s is not None and (tb.tokens_per_s is None or ta.tokens_per_s > tb.tokens_per_s)

    def _fits(self, trials: int) -> bool:
        """Whether ``trials`` more trials fit before the deadline, each as long as the longest so
        far. Before any has run nothing is known, so the first one starts (the deadline stops it)."""
        longest = max(self.trial_walls_s, default=0.0)
        return time.monotonic() + trials * longest <= self.deadline

    def _time(self, c: Candidate) -> bool:
        """Time ``c`` unless the budget has no room for it and the confirmation; False when it had none."""
        row = self.rows[c]
        row.trial = row.trial or self.read_trial(c.key)
        if row.trial is None:
            if not self._fits(1 + len(CONFIRM)):
                self.stopped_early = True
                return False
            try:
                row.trial = self._run(c.key, c)
            except OutOfTime:
                self.stopped_early = True
                return False
        row.status, row.reason = ("timed", "") if row.trial.error is None else ("failed", row.trial.error)
        return True

    def _run(self, name: str, c: Candidate) -> TrialResult:
        # A trial ten times as long as the longest so far has hung (a deadlock, a stuck rank):
        # it fails, and the search goes on. Before any has finished, only the budget limits it.
        result = self.run_trial(name, c, 10 * max(self.trial_walls_s) if self.trial_walls_s else None)
        self.trial_walls_s.append(result.wall_s)
        self.on_trial_done(name, result)
        return result

    def _confirm(self, best: Candidate) -> Candidate:
        """Run the user's config and ``best`` back to back; keep ``best`` only if it is as fast."""
        best_trial = self.rows[best].trial
        if best == self.yours or best_trial is None or best_trial.error is not None:
            return self.yours if self.yours in self.survivors() else best
        if self.yours not in self.survivors():
            return best  # the user's config does not fit the budget: nothing to compare with
        names = [f"{name}-{best.key}" for name in CONFIRM]
        earlier = [self.read_trial(name) for name in names]
        if all(earlier):
            self.confirmation = dict(zip(CONFIRM, earlier, strict=True))
        elif not self._fits(len(CONFIRM)):
            self.stopped_early = True
            return best
        else:  # both, one right after the other, even if an earlier sitting ran one of them
            try:
                for short, name, c in zip(CONFIRM, names, (self.yours, best), strict=True):
                    self.confirmation[short] = self._run(name, c)
            except OutOfTime:
                self.confirmation.clear()
                self.stopped_early = True
                return best
        yours, tuned = (self.confirmation[n].tokens_per_s for n in CONFIRM)
        return best if tuned is not None and (yours is None or tuned >= yours) else self.yours


def mark_untimed(rows: dict[Candidate, Row]) -> None:
    """Rows the search never reached say so."""
    for row in rows.values():
        if row.status == "not timed" and not row.reason:
            row.reason = "not reached: the search changes one knob at a time from the best so far"


def trial_folder(out: Path, name: str) -> Path:
    return out / "trials" / name
