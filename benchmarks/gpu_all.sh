#!/bin/bash
# One call on the GPU machine, from the repository root: every gpu-marked test, the
# Triton kernel tests on CUDA, the offload benchmark and the end-to-end benchmark (a).
#   bash benchmarks/gpu_all.sh            (LIMIT=seconds for the whole script, default 560)
# The attention benchmark with its FlashInfer peer is benchmarks/gpu_check.sh.
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_all 560 10
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch,triton,transformers as t;print(torch.__version__,triton.__version__,t.__version__)"
echo "== gpu tests"
timeout "$(left)" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_ops_gpu.py tests/test_tiers_gpu.py tests/test_engine_gpu.py tests/test_stores.py
echo "== triton kernels on CUDA"
timeout "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_ops_triton.py tests/test_storage.py
echo "== offload benchmark"
timeout "$(( $(left) / 2 ))" python3 benchmarks/bench_offload.py --device cuda --skip redis,ttft
echo "== end-to-end benchmark (a), pagedkv vs generate_batch"
timeout "$(left)" python3 benchmarks/bench_e2e.py --workloads a --plan pk,tf
echo "== done in $(( $(date +%s) - T0 )) s"
