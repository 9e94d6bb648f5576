#!/bin/bash
# On the GPU machine, from the repository root: the cascade tests on CUDA, then the
# cascade benchmark against FlashInfer's MultiLevelCascadeAttentionWrapper, in one go.
#   bash benchmarks/gpu_cascade.sh [--quick] [--sweep] [--no-flashinfer]
# FlashInfer comes from .whl/ as in gpu_check.sh; its JIT build of the prefill kernels
# the cascade wrapper uses starts in the background first, while the tests run.
set -u
LIMIT="${LIMIT:-360}"; T0=$(date +%s)  # seconds for the whole script
left() { echo $(( LIMIT - ($(date +%s) - T0) - 5 )); }
O="${OUT:-benchmarks/out}"; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$O/gpu_cascade.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"
python3 -c "import pytest" 2>/dev/null || { ls .whl/extra/*.whl >/dev/null 2>&1 && \
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_test .whl/extra/*.whl && \
  export PYTHONPATH="$PYTHONPATH:/tmp/site_test"; }
FI=""; EXTRA=""
if ls .whl/flashinfer_python-*.whl >/dev/null 2>&1 && [[ " $* " != *" --no-flashinfer "* ]]; then
  python3 -c "import flashinfer" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps \
    --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; }
  NVCC=$(readlink -f "$(command -v nvcc)"); export CUDA_HOME=$(dirname "$(dirname "$NVCC")")
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a
  export LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  python3 benchmarks/bench_cascade.py --prebuild-flashinfer >"$O/fi_cascade_build.log" 2>&1 &
  FI=$!
fi
echo "== cascade tests on CUDA $(date -u +%T)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_ops_cascade_gpu.py tests/test_ops_cascade.py tests/test_ops_cascade_errors.py 2>&1 | tail -15
if [ -n "$FI" ]; then
  echo "== waiting for the FlashInfer build $(date -u +%T)"
  timeout $(( $(left) / 2 )) tail --pid=$FI -f /dev/null
  cat "$O/fi_cascade_build.log" | tail -5
  kill -0 "$FI" 2>/dev/null && { echo "FlashInfer still building: bench without it"; EXTRA="--no-flashinfer"; }
fi
echo "== bench $(date -u +%T)"
timeout "$(left)" python3 benchmarks/bench_cascade.py "$@" $EXTRA
echo "== end $(date -u +%T)"
