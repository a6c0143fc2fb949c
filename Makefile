# moneylion — `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install install-bench run test test-fast lint format docs bench bench-compare soak screenshots clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its pinned dependencies

install-bench: $(STAMP) ## add the bench extra (pyspark, for bench/lake.py's Spark reader; needs Java 17+)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'

run: $(STAMP) ## start the daemon on config.toml (inbox/ -> warehouse/, API on 127.0.0.1:8000)
	$(BIN)/moneylion serve

test: $(STAMP) ## run the whole test suite: on two workers, then the tests that time an answer alone
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

test-fast: $(STAMP) ## the test suite without the slow end-to-end, crash and property tests
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff format check, ruff check and mypy --strict
	$(BIN)/ruff format --check moneylion tests bench
	$(BIN)/ruff check moneylion tests bench
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format moneylion tests bench
	$(BIN)/ruff check --fix moneylion tests bench

docs: $(STAMP) ## rewrite README.md's tables from their declarations (config keys, reasons, commands)
	$(BIN)/python -m moneylion.docs_tables

bench: $(STAMP) ## run the benchmarks and print their figures (takes minutes)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/micro.py
	$(BIN)/python bench/steps.py
	$(BIN)/python bench/corrections.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/crash.py
	$(BIN)/python bench/lake.py

bench-compare: $(STAMP) ## this tree's single-file figures against bench/BASELINE's commit, interleaved, with ratios
	$(BIN)/python bench/compare.py

soak: $(STAMP) ## an hour of 50 files/s into the daemon: its memory and latency over time, then verify
	$(BIN)/python bench/soak.py

screenshots: $(STAMP) ## retake docs/dashboard-{desktop,phone}.png with the browser tests (needs chromium)
	MONEYLION_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_dashboard_browser.py -k screenshot

clean: ## remove the venv and caches (never inbox/ or warehouse/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
