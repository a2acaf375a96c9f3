# Every target sets up .venv by itself on first use (and again when pyproject.toml or the
# constraints change). TORCH picks the torch build: the default is the CPU build of this machine
# kind; GPU users install their CUDA torch first (see README) or pass e.g. TORCH="torch==2.13.0".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= requirements/constraints-cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/img-guidance demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/aligner.py
	$(BIN)/python benchmarks/pipeline_cost.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/detector.py
	$(BIN)/python benchmarks/shapes_judge.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
