# cahal-bids: the README's commands. Everything runs inside .venv at the repo root;
# no target touches the system Python.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.cahal-installed
# CPU machines take the CPU wheel; GPU users may override, e.g. TORCH_SPEC='torch>=2.2,<3'
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output
PYTEST_ARGS ?=

.PHONY: help venv demo test lint clean

help:
	@echo 'make demo   set up .venv and run cahal-bids on an embedded default'
	@echo 'make test   set up .venv and run the whole test suite'
	@echo 'make lint   ruff on the package, tests, workflows and benchmarks'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python setup.cfg pyproject.toml
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -c 'import torch' 2>/dev/null || $(VPY) -m pip install --quiet '$(TORCH_SPEC)'
	$(VPY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m cahal_bids.demo $(DEMO_DIR)

test: $(STAMP)
	NIPYPE_NO_ET=1 $(VPY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cahal_bids tests workflows benchmarks run.py
	$(VENV)/bin/ruff format --check cahal_bids tests workflows benchmarks run.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info .pytest_cache
