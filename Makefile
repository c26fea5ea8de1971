# make train: set up .venv and run the default main job (2 CPU ranks, or every local GPU).
# make test:  set up .venv if needed and run the linter and the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= ds_configs/cpu_tiny.json
# torch is installed first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
# where a CPU one is wanted. On a GPU machine PyPI's torch==2.13.0 is the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: train test lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m smoe_ds.deepspeed_ops
	touch $@

train: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/local.sh $(CONFIG) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check smoe_ds tests
	$(VENV)/bin/ruff format --check smoe_ds tests

test: $(VENV)/.installed lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
