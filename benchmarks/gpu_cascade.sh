#!/bin/bash
# On the GPU machine, from the repository root: the cascade tests on CUDA, then the
# cascade benchmark against FlashInfer's MultiLevelCascadeAttentionWrapper, in one go.
#   bash benchmarks/gpu_cascade.sh [--quick] [--sweep] [--no-flashinfer]
# FlashInfer comes from .whl/ as in gpu_check.sh; its JIT build of the prefill kernels
# the cascade wrapper uses starts in the background first, while the tests run.
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_cascade 360  # LIMIT: seconds for the whole script
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"
gpu_test_deps
FI=""; EXTRA=""
if gpu_flashinfer "$@"; then
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
