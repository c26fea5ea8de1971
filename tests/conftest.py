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
    from smoe_ds.ops.prebuild import prebuild

    prebuild()


# The files whose runs take longest, longest first. pytest-xdist (make test: --dist loadfile) hands
# files to workers in collection order, so these start first and the short files fill the gaps,
# instead of a long file starting last and running alone at the end.
LONGEST_FILES = (
    "test_reshard.py",
    "test_zero3_checkpoints.py",
    "test_zero3.py",
    "test_paper_experiment.py",
    "test_resume.py",
    "test_faults.py",
    "test_checkpoint_export.py",
    "hf/test_finetune_smoe_export.py",
    "test_train_e2e.py",
    "hf/test_finetune.py",
    "test_bench.py",
    "hf/test_mwp_finetune.py",
    "hf/test_mwp_experiment.py",
)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(order)))
