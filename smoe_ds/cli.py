"""How every command ends: its job's errors as one line and an exit code, and the process group closed.

The commands (``smoe_ds.train``, ``finetune``, ``evaluate``, ``convert``, ``generate``) run
their work as ``sys.exit(run_main(job))``, under any launcher or none.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from smoe_ds import distributed as D
from smoe_ds import watchdog
from smoe_ds.config import ConfigError
from smoe_ds.numerics import NumericalFault


def _launcher_rank() -> int:
    """This process's rank as the launcher set it: known before, and without, a process group."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def run_main(job: Callable[[], None]) -> int:
    """Run ``job``; a ConfigError becomes one line on stderr (from rank 0) and exit code 2."""
    try:
        job()
        D.barrier()  # peers finish together, so no watchdog mistakes a finished peer for a dead one
    except (ConfigError, NumericalFault) as e:  # every rank raises it together; one of them says so
        if _launcher_rank() == 0:
            print(f"smoe-ds: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        traceback.print_exc()
        # A failed collective usually means a peer died: name it. Any other error is this rank's own.
        cause = watchdog.explain_collective_failure() if watchdog.is_communication_error(e) else None
        if cause:
            print(f"smoe-ds: error: {cause}", file=sys.stderr, flush=True)
            return watchdog.EXIT_PEER_LOST
        return 1
    finally:
        watchdog.stop()
        D.shutdown()
    return 0
