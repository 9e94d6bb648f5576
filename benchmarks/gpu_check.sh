#!/bin/bash
# On the GPU machine, from the repository root: the gpu-marked tests, the Triton kernel
# tests on CUDA, then the attention benchmark, in one go.
#   bash benchmarks/gpu_check.sh [--sweep] [--quick] [--no-flashinfer] [--features] [--host]
# (--features: only the sliding-window / softcap / sinks benchmark; LIMIT=560 for it;
#  --host: benchmarks/bench_host.py, the host cost per eager call, instead of the bench;
#  TEST_LIMIT=seconds for the pytest step, default 240)
# FlashInfer (the peer) comes from .whl/ (flashinfer-python + apache-tvm-ffi wheels, see
# benchmarks/RESULTS.md); its JIT build starts in the background first, while tests run.
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_check 345  # LIMIT: seconds for the whole script
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"
gpu_test_deps
FI=""; EXTRA=""
if gpu_flashinfer "$@"; then
  python3 benchmarks/_flashinfer_build.py >"$O/fi_build.log" 2>&1 &
  FI=$!
fi
echo "== pytest (gpu + triton on CUDA) $(date -u +%T)"
timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_ops_triton.py tests/test_ops_gpu.py \
  tests/test_ops_features_triton.py tests/test_ops_lean.py \
  -o addopts="" 2>&1 | tail -25
echo "== tests done $(date -u +%T)"
if [ -n "$FI" ]; then
  echo "== waiting for the FlashInfer build"
  timeout $(( $(left) / 3 )) tail --pid=$FI -f /dev/null
  tail -5 "$O/fi_build.log"
  kill -0 "$FI" 2>/dev/null && { echo "FlashInfer still building: bench without it"; EXTRA="--no-flashinfer"; }
fi
echo "== bench $(date -u +%T)"
if [[ " $* " == *" --host "* ]]; then
  timeout "$(left)" python3 benchmarks/bench_host.py $EXTRA
else
  timeout "$(left)" python3 benchmarks/bench_attention.py "$@" $EXTRA
fi
echo "== end $(date -u +%T)"
