# Two commands for a fresh clone:
#   make serve   create .venv on first use, then serve the default model on an embedded local Ray cluster
#   make test    create .venv on first use, then run the whole test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test install clean

install: $(STAMP)

# torch comes first, pinned to the CPU wheel that lies on disk: a plain `torch` would pull
# a multi-GB CUDA build. Re-run when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/moe-cluster serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
