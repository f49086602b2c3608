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

# Until the Serve cluster lands: build the demo checkpoint once, then generate from it.
run: install
	@test -f $(DATA_DIR)/demo-mixtral/config.json || $(VENV)/bin/moe-serve make-demo --out $(DATA_DIR)/demo-mixtral
	$(VENV)/bin/moe-serve generate --model $(DATA_DIR)/demo-mixtral --prompt "Experts live on" --max-tokens 24

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check router serving deployments tests benchmarks
	$(VENV)/bin/ruff format --check router serving deployments tests benchmarks

bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) $(DATA_DIR)
