"""Dead-rank detection: every rank beats a counter in the job's store; a silent peer ends the job.

Why: when a rank dies, its peers wait inside a collective. gloo usually notices a closed socket,
NCCL often does not, and a collective timeout long enough for real work (minutes) is far too
long to wait for a dead peer. So each rank runs a daemon thread that, every
``interval_s`` seconds, increments its own key in the c10d store the process group was built
on (hosted by rank 0, or by torchrun's agent) and reads everyone else's. A peer whose counter
has not moved for ``timeout_s`` is declared dead: this rank prints one line naming it and
exits with :data:`EXIT_PEER_LOST`, from the thread, because the main thread may be stuck in
C++. Losing the store itself means its host (rank 0 or the first node's launcher) is gone.

Counters rather than timestamps, so clocks on different nodes never need to agree.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_PEER_LOST = 3
_KEY = "smoe_ds/heartbeat/{}"
_STORE_MISSES_BEFORE_GIVING_UP = 2  # one miss can be a peer finishing first; two is a dead host


class PeerWatchdog:
    """Heartbeats for ``world`` ranks; ``hosts[r]`` names rank r's machine in messages."""

    def __init__(
        self,
        store,
        rank: int,
        world: int,
        hosts: list[str],
        interval_s: float,
        timeout_s: float,
        store_timeout_s: float = 5.0,
    ):
        self.store, self.rank, self.world, self.hosts = store, rank, world, hosts
        self.interval_s, self.timeout_s, self.store_timeout_s = interval_s, timeout_s, store_timeout_s
        self._beats = 0
        self._stopping = threading.Event()
        self._last_change: dict[int, tuple[bytes, float]] = {}
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Publish this rank's first beat; call on every rank, then pass a barrier, then beat on."""
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name="smoe-ds-peer-watchdog")
        self._thread.start()

    def stop(self) -> None:
        """Stop beating. The thread is joined, so that at a normal exit no store call of it is
        still running while the process group and the interpreter are torn down: that ends a
        rank with 'terminate called without an active exception'. A store call returns within
        the store's timeout (a dead store included), so the join waits at most that long; a
        1-second bound was seen to be too short on a loaded machine (CI, load 7)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.store_timeout_s + 1.0)

    # -- the thread ---------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(_KEY.format(self.rank), str(self._beats))

    def _read(self) -> list[bytes]:
        return self.store.multi_get([_KEY.format(r) for r in range(self.world)])

    def _run(self) -> None:
        misses = 0
        while not self._stopping.wait(self.interval_s):
            try:
                self._beat()
                values = self._read()
                misses = 0
            except Exception as e:  # noqa: BLE001 - any store failure means the same thing
                misses += 1
                if misses >= _STORE_MISSES_BEFORE_GIVING_UP:
                    self._fail(self.store_lost(f" ({type(e).__name__})"))
                continue
            dead = self._silent_peers(values, time.monotonic())
            if dead:
                self._fail(self.describe(dead, f"sent no heartbeat for {self.timeout_s:.0f}s"))

    def _silent_peers(self, values: list[bytes], now: float) -> list[int]:
        dead = []
        for r, v in enumerate(values):
            seen = self._last_change.get(r)
            if seen is None or seen[0] != v:
                self._last_change[r] = (v, now)
            elif r != self.rank and now - seen[1] > self.timeout_s:
                dead.append(r)
        return dead

    def store_lost(self, detail: str = "") -> str:
        return (
            f"lost the job's rendezvous store{detail}: the process hosting it (rank 0 on {self.hosts[0]}, "
            "or the launcher on the first node) has died"
        )

    def describe(self, dead: list[int], why: str) -> str:
        names = ", ".join(f"rank {r} (on {self.hosts[r]})" for r in dead)
        return f"{names} {why} (killed, crashed or hung); rank {self.rank} stops too"

    def _fail(self, message: str) -> None:
        if self._stopping.is_set():  # the job is ending normally; peers leave at their own pace
            return
        print(f"smoe-ds: error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    # -- after a collective failed in the main thread -----------------------------------------

    def silent_now(self) -> list[int] | None:
        """Peers whose counter does not move over ~2.5 beats; None when the store is gone.

        Called after a collective raised, to name the rank that took the job down.
        """
        self.stop()  # from here on the main thread reports; the thread must not exit under it
        try:
            before = self._read()
            time.sleep(2.5 * self.interval_s)
            after = self._read()
        except Exception:  # noqa: BLE001
            return None
        return [r for r in range(self.world) if r != self.rank and before[r] == after[r]]


_active: PeerWatchdog | None = None


def start(interval_s: float, timeout_s: float) -> PeerWatchdog | None:
    """Start this rank's watchdog on the default process group's store (no-op for one rank)."""
    global _active
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    # The group's own store; a clone so the thread has its own connection, with a short timeout
    # so that a dead store host is noticed in seconds.
    store = dist.distributed_c10d._get_default_store().clone()
    store_timeout_s = max(5.0, 2 * interval_s)
    store.set_timeout(timedelta(seconds=store_timeout_s))
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, os.uname().nodename)
    _active = PeerWatchdog(store, dist.get_rank(), dist.get_world_size(), hosts, interval_s, timeout_s, store_timeout_s)
    _active.start()
    dist.barrier()  # every rank's first beat is in the store before anyone reads
    return _active


def stop() -> None:
    if _active is not None:
        _active.stop()


def is_communication_error(e: BaseException) -> bool:
    """Whether ``e`` came out of a collective or the store (gloo raises plain RuntimeErrors)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection", "Socket"))


def explain_collective_failure() -> str | None:
    """A one-line cause for a failed collective, naming the dead rank(s) if the heartbeats show them."""
    if _active is None:
        return None
    silent = _active.silent_now()
    if silent is None:
        return _active.store_lost()
    return _active.describe(silent, "stopped sending heartbeats") if silent else None
