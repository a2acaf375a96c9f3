# Every target sets up .venv by itself on first use (and again when pyproject.toml or the
# constraints change). TORCH picks the torch build: the default is the CPU build of this machine
# kind; GPU users install their CUDA torch first (see README, Install) or pass e.g. TORCH="torch==2.13.0".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= requirements/constraints-cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint format bench clean

install: $(STAMP) browser

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# The study's browser tests drive the system's Chromium (Debian's package), installed here when it is
# missing; without root or apt it is left out and those tests skip, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
		echo "apt-get could not install chromium: the browser tests will skip"; \
	else \
		echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser tests will skip"; \
	fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/img-guidance demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.aligner
	$(BIN)/python -m benchmarks.pipeline_cost
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.detector
	$(BIN)/python -m benchmarks.shapes_judge

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
