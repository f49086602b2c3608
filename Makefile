# Developer commands. CI runs `make test` (through .ci/run), exactly as the README says.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= .data

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Serve the demo model (built into $(DATA_DIR) on first start) with 2 expert shards on http://127.0.0.1:8000.
run: install
	$(VENV)/bin/moe-serve run --config configs/demo.yaml --data-dir $(DATA_DIR)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check router serving deployments loadtests tests benchmarks
	$(VENV)/bin/ruff format --check router serving deployments loadtests tests benchmarks

bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) $(DATA_DIR)
