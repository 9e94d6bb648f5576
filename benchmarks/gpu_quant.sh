#!/bin/bash
# On the GPU machine, from the repository root: the compressed-KV (issue 17) gpu tests,
# the Triton quantized-kernel tests on CUDA, then benchmarks/bench_quant.py (fp8 / int8
# decode vs bf16 and vs FlashInfer's fp8-KV decode) and, time allowing, the engine's
# workload (b) with bf16 and fp8 KV (benchmarks/bench_e2e.py --kv-dtype).
#   bash benchmarks/gpu_quant.sh [--no-flashinfer] [--no-e2e]
# LIMIT=seconds for the whole script (default 560); TEST_LIMIT for the pytest step (150).
# FlashInfer comes from .whl/ as in gpu_check.sh (its JIT build runs while the tests do).
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_quant 560
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
gpu_test_deps
FI=""; EXTRA=""
if gpu_flashinfer "$@"; then
  python3 benchmarks/_flashinfer_build.py --fp8 >"$O/fi_build_quant.log" 2>&1 &
  FI=$!
fi
echo "== pytest (compressed KV on CUDA) $(date -u +%T)"
timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py \
  tests/test_quant_attention.py tests/test_quant_write.py tests/test_quant_storage.py \
  tests/test_quant_tiers.py -o addopts="" 2>&1 | tail -25
echo "== tests done $(date -u +%T)"
if [ -n "$FI" ]; then
  timeout $(( $(left) / 4 )) tail --pid=$FI -f /dev/null
  tail -4 "$O/fi_build_quant.log"
  kill -0 "$FI" 2>/dev/null && { echo "FlashInfer still building: bench without it"; EXTRA="--no-flashinfer"; }
fi
echo "== bench_quant $(date -u +%T)"
timeout "$(( $(left) * 2 / 3 ))" python3 benchmarks/bench_quant.py $EXTRA
if [[ " $* " != *" --no-e2e "* ]]; then
  for kv in "" fp8; do
    echo "== bench_e2e workload b ${kv:-bf16} $(date -u +%T)"
    timeout "$(( $(left) / 2 ))" python3 benchmarks/bench_e2e.py --plan pk --workloads b \
      --out "$O" --no-plot ${kv:+--kv-dtype $kv} 2>&1 | grep -E "pk_b|error|Error" | tail -3
  done
fi
echo "== end $(date -u +%T)"
