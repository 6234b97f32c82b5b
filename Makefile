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
# Debian packages the Slurm, browser and container-image tests need: package=command that
# proves it is there (buildah and mmdebstrap build containers/Dockerfile for real here)
SYSTEM_DEPS ?= slurm-wlm=slurmctld munge=munged chromium=chromium buildah=buildah \
	mmdebstrap=mmdebstrap

.PHONY: help venv demo test test-fast lint clean system-deps

help:
	@echo 'make demo   set up .venv and run cahal-bids on an embedded default'
	@echo 'make test   set up .venv and run the whole test suite'
	@echo 'make test-fast  the unit tests only (no slow, shared-data, Slurm or browser tests)'
	@echo 'make lint   ruff on the package, tests, examples and benchmarks'
	@echo 'make docs   build the Sphinx documentation into docs/_build/html (warnings are errors)'
	@echo 'make system-deps  install the Debian packages the Slurm, browser and image tests use (root)'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python setup.cfg pyproject.toml
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -c 'import torch' 2>/dev/null || $(VPY) -m pip install --quiet '$(TORCH_SPEC)'
	$(VPY) -m pip install --quiet -e '.[test,dev,docs]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m cahal_bids.cli.demo $(DEMO_DIR)

# Installs only what is missing (a second run is instant); without root or apt-get it says
# what is missing and carries on: the tests that need it then skip with the reason.
system-deps:
	@missing=''; \
	for entry in $(SYSTEM_DEPS); do \
		package=$${entry%%=*}; program=$${entry#*=}; \
		command -v "$$program" >/dev/null 2>&1 \
			|| dpkg-query -W -f='$${db:Status-Status}' "$$package" 2>/dev/null | grep -qx installed \
			|| missing="$$missing $$package"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing \
			|| echo "system-deps: apt-get failed; the tests that need$$missing will skip"; \
	else \
		echo "system-deps: missing Debian packages:$$missing (not root or no apt-get; the" \
			"tests that need them will skip)"; \
	fi

test: system-deps $(STAMP)
	NIPYPE_NO_ET=1 $(VPY) -m pytest $(PYTEST_ARGS)

# The inner loop while editing: what `make test` runs less the tests marked slow (full
# BIDS-App runs, training, shipped zoos), shared_data, slurm or browser. CI runs `make test`.
FAST_MARKERS := not slow and not shared_data and not slurm and not browser
test-fast: $(STAMP)
	NIPYPE_NO_ET=1 $(VPY) -m pytest -m '$(FAST_MARKERS)' $(PYTEST_ARGS)

.PHONY: docs
docs: $(STAMP)
	NIPYPE_NO_ET=1 $(VPY) -m sphinx -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check cahal_bids tests examples benchmarks run.py
	$(VENV)/bin/ruff format --check cahal_bids tests examples benchmarks run.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info .pytest_cache
