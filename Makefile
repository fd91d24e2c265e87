# fedjewel — `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck pytest demo demo-stop bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned; this machine's pip configuration finds its CPU build on local
	# disk. Elsewhere PyPI's wheel pulls several GB of CUDA libraries: set
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build (README).
	$(BIN)/python -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev,eval]"
	@touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy coordinator regional_node shared

pytest: install
	$(BIN)/python scripts/run_pytest.py

test: lint typecheck pytest

demo: install
	$(BIN)/python -m shared.demo

demo-stop:
	$(BIN)/python -m shared.demo --stop

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
