# prrtquant — the two commands of the README, plus benchmarks.
#   make run    install into .venv if needed, run the workflow on the bundled synthetic cohort
#   make test   install into .venv if needed, run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml envs/constraints.txt | cksum | cut -d' ' -f1)
CORES ?= 2

.PHONY: run test bench lint install clean-results

install: $(STAMP)

$(STAMP): pyproject.toml envs/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c envs/constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --cores $(CORES) --configfile config.yaml

# two xdist workers, one test module each at a time (module fixtures built once), longest modules first
# (tests/conftest.py SLOW_FIRST); the 15 slowest steps are listed at the end
test: $(STAMP)
	$(BIN)/python -m pytest -n $(CORES) --dist loadfile --no-loadscope-reorder --durations=15

lint: $(STAMP)
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --lint --configfile config.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean-results:
	rm -rf results .snakemake
