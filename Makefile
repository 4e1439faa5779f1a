# One venv for everything. torch is pinned here and only here (pyproject says torch>=2.3), and comes
# from TORCH_INDEX, the PyTorch CPU index, when that answers (see .ci/install). TORCH_INDEX= (empty):
# from pip's configured indexes, where PyPI's Linux wheel is the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench docs clean

$(STAMP): pyproject.toml
	@PYTHON='$(PYTHON)' VENV='$(VENV)' TORCH='$(TORCH)' TORCH_INDEX='$(TORCH_INDEX)' .ci/install
	@touch $(STAMP)

install: $(STAMP)

# The demo is rebuilt in demo/ (git-ignored) and kept there, to try the other commands on.
demo: $(STAMP)
	rm -rf demo
	$(BIN)/safelora demo --keep demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/bench_hub.py

# The README's example output: docs/examples/summary.md and similarity.png, from the demo example.
docs: $(STAMP)
	$(BIN)/python docs/examples/render.py

clean:
	rm -rf $(VENV) .venv-mlx demo build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
