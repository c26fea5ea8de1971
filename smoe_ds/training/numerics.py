"""NaN/inf losses in fp32 and bf16: skip the update, and stop after too many in a row.

In fp16 DeepSpeed's loss scaler already skips overflowing steps (and counts them in
``engine.skipped_steps``), so the guard stays off there. Elsewhere nothing would stop a NaN
loss from reaching the weights through backward and the optimizer, so every micro-batch's
loss is checked on every rank *before* backward. A bad micro-batch on any rank is skipped on
all of them (the decision is all-reduced, so no rank waits in a collective the others skip),
and the engine takes the next micro-batch in its place. After ``max_bad_steps`` bad ones in a
row the run stops with :class:`NumericalFault`: no update, and no save, has happened since
the last good step, so the newest checkpoint is still a good one.
"""

from __future__ import annotations

import torch

from smoe_ds.distributed import process_group as D

EXIT_NUMERICAL_FAULT = 4


class NumericalFault(RuntimeError):
    """The loss stayed NaN/inf; ``exit_code`` is what the process should exit with."""

    exit_code = EXIT_NUMERICAL_FAULT


class BadLossGuard:
    def __init__(self, max_bad_steps: int, enabled: bool):
        self.max_bad_steps = max_bad_steps
        self.enabled = enabled
        self.in_a_row = 0
        self.skipped = 0  # bad micro-batches skipped in this run
        self.first_bad_step: int | None = None

    def bad_ranks(self, loss: torch.Tensor) -> list[int]:
        """Ranks whose ``loss`` (a scalar) is NaN or inf; the same list on every rank."""
        if not self.enabled:
            return []
        flags = torch.zeros(D.world_size(), dtype=torch.float32)
        flags[D.rank()] = float(not torch.isfinite(loss.detach().float().cpu()).item())
        return [r for r, bad in enumerate(D.all_reduce_sum(flags).tolist()) if bad]

    def record_bad(self, step: int, ranks: list[int], last_checkpoint: str | None) -> None:
        """Count a skipped micro-batch; raise NumericalFault when there were too many in a row."""
        self.skipped += 1
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if self.in_a_row >= self.max_bad_steps:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise NumericalFault(
                f"the training loss was NaN/inf {self.in_a_row} times in a row (run.max_bad_steps), "
                f"from step {self.first_bad_step} to step {step}, on rank(s) {', '.join(map(str, ranks))}; "
                f"no update was applied and {where}. Lower the learning rate or add warmup, then relaunch "
                "(it resumes from that checkpoint)"
            )

    def record_good(self) -> None:
        self.in_a_row = 0
        self.first_bad_step = None
