# Commands for a fresh clone (each creates .venv on first use: a few minutes, with progress shown):
#   make install     create .venv and install moe-cluster with its test dependencies (CPU torch)
#   make serve       serve the default model on an embedded local Ray cluster, http://127.0.0.1:8000/
#                    make serve PORT=8100                      another port
#                    make serve ARGS="--checkpoint ckpt"       any other `moe-cluster serve` flags
#   make test        run the whole test suite (unit, k8s and cluster tiers; `slow` tests excluded)
#   make test-unit   run the unit and k8s tiers only: no Ray cluster is started
#   make clean       remove .venv and pytest's cache
PYTHON ?= python3
PORT ?=
ARGS ?=
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test test-unit install clean

install: $(STAMP)

# torch comes first, pinned to the CPU wheel that lies on disk: a plain `torch` would pull
# a multi-GB CUDA build. Re-run when pyproject.toml changes. pip prints what it collects
# and installs, so a first install is not minutes of silence.
$(STAMP): pyproject.toml
	@echo "==> [1/3] creating the virtual environment $(VENV) (a few seconds)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] installing torch==2.13.0, the CPU build (not the multi-GB CUDA one)"
	$(VENV)/bin/pip install --progress-bar on torch==2.13.0
	@echo "==> [3/3] installing moe-cluster with its test dependencies: Ray Serve, transformers, ..." \
	      "(a few minutes the first time)"
	$(VENV)/bin/pip install --progress-bar on -e '.[test]'
	touch $(STAMP)
	@echo "==> $(VENV) is ready"

# PORT= empty: the Serve config's port (8000); ARGS: passed to `moe-cluster serve` as they are
serve: $(STAMP)
	$(VENV)/bin/moe-cluster serve $(if $(PORT),--port $(PORT)) $(ARGS)

# --durations: the slowest tests at the end of CI's log (the suite is kept under ~15 minutes)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25

# Tests under tests/cluster carry the `cluster` marker (tests/cluster/conftest.py). A -m on the
# command line replaces the `-m 'not slow'` of pyproject's addopts, so it says `not slow` again.
test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not cluster and not slow"

clean:
	rm -rf $(VENV) .pytest_cache
