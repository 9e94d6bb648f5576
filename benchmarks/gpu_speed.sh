#!/bin/bash
# Issue 14's speed measurements, one call on the GPU machine, from the repository root:
#   bash benchmarks/gpu_speed.sh [OUT_DIR]     (default $OUT, else benchmarks/out)
#   BASE=.base/src  an older copy of src/ for the ~1B-shape comparison (skipped if absent)
#   LIMIT=seconds   for the whole script (default 470); QUICK=1: tiny shapes (a CPU smoke run)
# Writes JSON (and PNG) under OUT_DIR and a log gpu_speed.log there. Parts, in order:
#   1. bench_e2e (a)+(b), SmolLM2 shape, 256 requests: pagedkv (first + median of 3) and
#      generate_batch (first + 1 steady: ~40 s a run), floor, breakdown
#   2. bench_e2e, ~1B Llama shape, 64 requests, (a)+(b): pagedkv vs --baseline-src $BASE
#   3. bench_paged_cache: generate() with PagedCache vs the default cache, B=1,16,64, 512/1024, median of 2
#   4. bench_prompt_reuse --device cuda
# Each part gets a share of what is left (timeout), so a slow part cannot eat the others.
set -u
O="${1:-${OUT:-benchmarks/out}}"; mkdir -p "$O"
LIMIT="${LIMIT:-470}"; T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) - 5 )); }
share() { local l; l=$(left); echo $(( l * $1 / 100 > 1 ? l * $1 / 100 : 1 )); }
export PYTHONUNBUFFERED=1
exec > >(tee -a "$O/gpu_speed.log") 2>&1
PY="${PYTHON:-python3}"
DEV=cuda; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || DEV=cpu
$PY -c "import torch,transformers as t;print(torch.__version__,t.__version__)"
if [ "${QUICK:-0}" = 1 ]; then
  # generate_batch is left out here: on a CPU it takes minutes even on the tiny shape
  E2E=(--tiny --repeat 1 --plan pk); BIG=(--tiny --config llama1b --repeat 1); PC=(--quick)
  PR=(--quick); DEV=cpu
else
  E2E=(--repeat 3 --tf-repeat 1 --plan pk,tf); BIG=(--config llama1b --requests 64 --repeat 3)
  PC=(--batches 1,16,64 --lengths 512,1024 --new 128 --repeat 2); PR=()
fi
echo "== 1. bench_e2e (a)+(b), 256 requests, pagedkv + generate_batch ($(share 45) s)"
timeout "$(share 45)" $PY benchmarks/bench_e2e.py --device $DEV "${E2E[@]}" \
  --workloads a,b --out "$O/bench_e2e_smollm2.json" --quiet --no-plot
BASEARG=(); [ -d "${BASE:-.base/src}/pagedkv" ] && BASEARG=(--baseline-src "${BASE:-.base/src}")
[ ${#BASEARG[@]} = 0 ] && echo "(no ${BASE:-.base/src}/pagedkv: the ~1B run has no baseline)"
echo "== 2. bench_e2e ~1B Llama shape, 64 requests, vs ${BASEARG[*]:-nothing} ($(share 45) s)"
timeout "$(share 45)" $PY benchmarks/bench_e2e.py --device $DEV "${BIG[@]}" --plan pk \
  --workloads a,b "${BASEARG[@]}" --baseline-timeout "$(share 30)" \
  --out "$O/bench_e2e_llama1b.json" --quiet --no-plot
echo "== 3. generate(): PagedCache vs the default cache ($(share 70) s)"
timeout "$(share 70)" $PY benchmarks/bench_paged_cache.py --device $DEV "${PC[@]}" \
  --out "$O/bench_paged_cache.json"
echo "== 4. bench_prompt_reuse ($(left) s)"
timeout "$(left)" $PY benchmarks/bench_prompt_reuse.py --device $DEV "${PR[@]}" \
  --out "$O/bench_prompt_reuse.json"
echo "== done in $(( $(date +%s) - T0 )) s; JSON in $O"
