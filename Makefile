# One venv for everything. torch is pinned here and only here (pyproject says torch>=2.3), and comes
# from TORCH_INDEX, the PyTorch CPU index, when that answers (see .ci/install). TORCH_INDEX= (empty):
# from pip's configured indexes, where PyPI's Linux wheel is the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@PYTHON='$(PYTHON)' VENV='$(VENV)' TORCH='$(TORCH)' TORCH_INDEX='$(TORCH_INDEX)' .ci/install
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/safelora demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/bench_hub.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
