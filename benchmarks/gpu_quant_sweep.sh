#!/bin/bash
# On the GPU machine, from the repository root: the sweep of the quantized decode kernel's
# variants (benchmarks/bench_quant_sweep.py: form x BLOCK_N x warps x stages x split
# sizing, fp8 and int8, vs bf16 and a d2d copy, CUDA graphs), then the CUDA tests of the
# formulations. LIMIT=seconds for the whole script (default 240); FlashInfer's fp8 decode
# is timed too when `--flashinfer` is given and flashinfer imports (not built here).
#   bash benchmarks/gpu_quant_sweep.sh [--flashinfer] [--shapes 64x4096:big,...]
set -u
LIMIT="${LIMIT:-240}"; T0=$(date +%s)
O="${OUT:-benchmarks/out}"; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OUT="$O"
export TRITON_DEFAULT_FP_FUSION=1
exec > >(tee -a "$O/gpu_quant_sweep.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== bench_quant_sweep $(date -u +%T)"
# the sweep gets all but ~45 s (the tests below), and stops by itself before its LIMIT
LIMIT=$(( LIMIT - 45 - ($(date +%s) - T0) )) timeout $(( LIMIT - 35 )) \
  python3 benchmarks/bench_quant_sweep.py "$@"
echo "== tests of the formulations on CUDA $(date -u +%T)"
python3 -c "import pytest" 2>/dev/null || { ls .whl/extra/*.whl >/dev/null 2>&1 && \
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_test .whl/extra/*.whl && \
  export PYTHONPATH="$PYTHONPATH:/tmp/site_test"; }
left=$(( LIMIT - ($(date +%s) - T0) - 3 ))
[ "$left" -gt 5 ] && timeout "$left" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_quant_decode_forms.py -k cuda 2>&1 | tail -8
echo "== end $(date -u +%T)"
