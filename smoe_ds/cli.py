"""How every command ends: its job's errors as one line and an exit code, and the process group closed.

The commands (``smoe_ds.train``, ``finetune``, ``evaluate``, ``convert``, ``generate``) run
their work as ``sys.exit(run_main(job))``, under any launcher or none.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from smoe_ds.config.renamed import launcher_rank
from smoe_ds.config.schema import ConfigError
from smoe_ds.distributed import process_group as D
from smoe_ds.distributed import watchdog
from smoe_ds.training.numerics import NumericalFault


def run_main(job: Callable[[], None]) -> int:
    """Run ``job``; a ConfigError becomes one line on stderr (from rank 0) and exit code 2.

    A rank of a multi-rank job then leaves at once (``os._exit``, stdout and stderr flushed) once
    its process group is closed, instead of returning: the interpreter's teardown after a
    distributed run was seen to end a finished rank with 'terminate called without an active
    exception' (exit 250, about one run in 300 in the test suite on a loaded machine), which
    the launcher reports as a failure. Everything the job writes is closed by then (checkpoints,
    results, and the monitors, which flush on every write).
    """
    multi_rank = False
    try:
        code = _run(job)
    finally:  # also when the job raised past _run (SystemExit from an argument parser)
        multi_rank = D.world_size() > 1
        watchdog.stop()
        D.shutdown()
    if multi_rank:
        sys.stdout.flush()
        sys.stderr.flush()
        _finalize_mpi()  # under mpirun a rank that leaves without MPI_Finalize fails the job
        os._exit(code)
    return code


def _finalize_mpi() -> None:
    """MPI_Finalize, where DeepSpeed's MPI discovery initialised MPI (mpi4py finalises it at exit,
    which ``os._exit`` skips)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _run(job: Callable[[], None]) -> int:
    try:
        job()
        D.barrier()  # peers finish together, so no watchdog mistakes a finished peer for a dead one
    except (ConfigError, NumericalFault) as e:  # every rank raises it together; one of them says so
        if launcher_rank() == 0:
            print(f"smoe-ds: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not watchdog.is_communication_error(e):
            traceback.print_exc()  # this rank's own error: the traceback is what to read
            return 1
        # A failed collective usually means a peer died. Say so at once, before naming it takes
        # a few heartbeats: a launcher that saw the peer die (the deepspeed launcher does) may
        # kill this rank any moment, and its last words should not be a raw gloo traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"smoe-ds: a collective failed ({type(e).__name__}: {first[:200]}); checking which rank stopped",
            file=sys.stderr,
            flush=True,
        )
        cause = watchdog.explain_collective_failure()
        if cause:
            print(f"smoe-ds: error: {cause}", file=sys.stderr, flush=True)
            return watchdog.EXIT_PEER_LOST
        traceback.print_exc()  # no peer was found silent: the failure is not explained, show it whole
        return 1
    return 0
