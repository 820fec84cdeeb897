# bpfree: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline data lives beside the checkout (../shared/data); override with BPFREE_DATA=/path.
export BPFREE_DATA ?= $(abspath ../shared/data)
export NLTK_DATA ?= $(BPFREE_DATA)/nltk_data
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install bpfree with its dependencies

run: install ## train the default experiment (backprop, seed MLP, MNIST)
	$(PY) run.py

test: install ## fast test suite (a few minutes on 2 CPU cores)
	$(PY) -m pytest

test-slow: install ## slower checks (full datasets, longer training)
	$(PY) -m pytest -m slow

tables: install ## rebuild results/tables/ (tables and their figures, experiments/*/tables.yaml) from the committed records
	$(PY) -m bpfree.tables

# a casual `make bench` writes the ignored runs/bench; BENCH_OUT=results/bench refreshes the committed rows
BENCH_OUT ?= runs/bench
bench: install ## step time of every method relative to backprop (cases: experiments/*/bench.yaml) -> $(BENCH_OUT)
	$(PY) scripts/bench.py --out $(BENCH_OUT) $(BENCH_ARGS)

bench-parallel: install ## staged (depth-parallel) training vs BP-best and the BP pipeline, one run -> $(BENCH_OUT)
	$(PY) scripts/bench_parallel.py --out $(BENCH_OUT) $(BENCH_PARALLEL_ARGS)

verify-data: install ## check every dataset file under $(BPFREE_DATA) against its SHA256SUMS
	$(PY) -m bpfree.data verify --root $(BPFREE_DATA)

lint: install ## ruff (pyproject [tool.ruff]), byte-compile everything, check the configs compose
	$(VENV)/bin/ruff check .
	$(PY) -m compileall -q bpfree scripts run.py tests
	$(PY) -m pytest -q tests/test_config.py

.PHONY: help install run test test-slow tables bench bench-parallel verify-data lint
