import os

import pytest

# Tests run many ranks on 2 cores: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built():
    """Compile DeepSpeed's CPU shm op once, here, before any test starts ranks: ranks that all
    compile it at once under a test timeout can be killed mid-build and leave a stale lock."""
    from smoe_ds.deepspeed_ops import prebuild

    prebuild()
