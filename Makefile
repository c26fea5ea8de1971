# make train: set up .venv and run the default main job (2 CPU ranks, or every local GPU);
#             make train ARGS="--set run.resume=false" starts it over in the same folder.
# make test:  set up .venv if needed and run the linter and every test (what CI runs).
# make test-fast: the linter, the unit tests and one end-to-end run (2 ranks under the deepspeed
#             launcher, 50 steps), in under 5 minutes on 2 cores: it skips every other test that
#             starts ranks (marked e2e by tests/conftest.py, which names the one it keeps) and slow.
# Tests run in PYTEST_WORKERS pytest-xdist workers: most of a multi-rank test's time is start-up
# and waiting (launchers, rendezvous, heartbeats), so two workers fill two cores better than one.
# --dist loadfile keeps each test file on one worker, so its module fixtures (trained runs) run once.
PYTEST_WORKERS ?= 2
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= ds_configs/cpu_tiny.json
# torch is installed first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
# where a CPU one is wanted. On a GPU machine PyPI's torch==2.13.0 is the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: train test test-fast lint clean clean-runs gpu-wheels gpu-check

# The ops are built with the venv's bin first on PATH, as train and test run: torch's JIT builder
# runs whichever ninja PATH finds, and ninja versions log commands differently, so building with
# one and loading with another rebuilds the ops (about a minute) on the first run. smoe_ds puts
# the venv's ninja first itself before any build (smoe_ds.ops.jit_build.use_this_pythons_ninja).
# pip byte-compiles every package at install (about a minute). Worth it: where PYTHONDONTWRITEBYTECODE
# is set (this machine and CI) Python never caches what it compiles, so without it every process
# the tests spawn recompiles torch, DeepSpeed and transformers (import 6.2-6.9 s against 3.2-3.3 s
# with bytecode, measured here), and CI took 3834 s with pip --no-compile against 1696 s before.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m smoe_ds.ops.prebuild
	touch $@

train: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/local.sh $(CONFIG) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check smoe_ds tests
	$(VENV)/bin/ruff format --check smoe_ds tests

test: $(VENV)/.installed lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test-fast: $(VENV)/.installed lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not e2e" --durations=15

# make gpu-wheels (here, with the package registry): .whl/ gets what the offline GPU machine lacks.
# make gpu-check (there): every GPU path checked and measured in a few minutes; see launch/gpu_check.sh.
gpu-wheels: $(VENV)/.installed
	PIP=$(VENV)/bin/pip bash launch/gpu_wheels.sh .whl

gpu-check:
	bash launch/gpu_check.sh

# make clean removes only what installing and testing made; every run under runs/ stays. .whl/
# stays too: the offline GPU machine that holds it cannot download it again (make gpu-wheels
# replaces it where there is a registry). make clean-runs is the one target that deletes runs.
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -path ./runs -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

clean-runs:
	rm -rf runs
