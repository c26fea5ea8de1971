"""Fault injection, so that the recovery paths are exercised by tests rather than trusted.

``SMOE_DS_INJECT_FAULT`` holds ``ACTION:RANK:POINT[:STEP]`` (several separated by commas):

* ``kill:1:train:5`` -- rank 1 SIGKILLs itself at the start of optimizer step 5;
* ``kill:0:eval`` -- rank 0 dies inside its first validation;
* ``kill:1:save:6`` -- rank 1 dies while saving step 6, after its shard files are written and
  before the ``latest`` pointer moves;
* ``hang:1:train:5`` -- rank 1 stops (SIGSTOP) at step 5: alive, silent, holding its sockets;
* ``nan:1:train:4`` -- rank 1's training loss is NaN from step 4 on (a numerical fault);
* ``nan:1:train:4:2`` -- only its first 2 micro-batches from step 4 on are NaN (a transient one).

Unset (the normal case) costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "SMOE_DS_INJECT_FAULT"


_poisoned_so_far = 0  # NaN micro-batches produced by this process, for the ``nan:...:COUNT`` form


def _matching(action: str, point: str, rank: int, step: int | None) -> list[str] | None:
    """The first spec naming this action, rank, point and step, split on ':'; None if there is none."""
    for spec in filter(None, os.environ.get(ENV, "").split(",")):
        parts = spec.split(":")
        if len(parts) < 3 or parts[0] != action or parts[2] != point or int(parts[1]) != rank:
            continue
        if len(parts) == 3:
            return parts
        if step is not None and (step >= int(parts[3]) if action == "nan" else step == int(parts[3])):
            return parts
    return None


def _matches(action: str, point: str, rank: int, step: int | None) -> bool:
    return _matching(action, point, rank, step) is not None


def maybe_die(point: str, rank: int, step: int | None = None) -> None:
    """SIGKILL (``kill``) or SIGSTOP (``hang``) this process if a fault names this rank and point (and step)."""
    if ENV not in os.environ:
        return
    for action, sig in (("kill", signal.SIGKILL), ("hang", signal.SIGSTOP)):
        if _matches(action, point, rank, step):
            os.kill(os.getpid(), sig)


def poisoned(point: str, rank: int, step: int) -> bool:
    """True when a ``nan`` fault asks for this rank's next loss to be NaN at this step."""
    global _poisoned_so_far
    parts = _matching("nan", point, rank, step) if ENV in os.environ else None
    if parts is None or (len(parts) > 4 and _poisoned_so_far >= int(parts[4])):
        return False
    _poisoned_so_far += 1
    return True
