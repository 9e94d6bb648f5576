#!/bin/bash
# On the GPU machine, from the repository root: torch_compile=True checked and measured.
#   bash benchmarks/gpu_compile.sh        LIMIT=seconds for the whole script (default 480:
#   under 190 s on the H200 the compiled run's warm-up, three inductor compiles of the
#   30-layer model, did not finish within its share)
#   QUICK=1: the tiny shape on the CPU (a smoke run of this script; the tests then skip)
# 1. the compile tests on CUDA (gpu-marked: compiled forward inside the CUDA graphs, tokens
#    vs eager) and test_engine_gpu's torch_compile test;
# 2. bench_e2e workload (a), SmolLM2 shape, pagedkv with --torch-compile (compiles and
#    captures in its warm-up, reported apart from the timed runs), then eager;
# 3. both side by side: tok/s, ms/step, device ms/step, set-up seconds, graphs compiled.
# JSON and the log gpu_compile.log under $OUT (default benchmarks/out).
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_compile 480  # LIMIT: seconds for the whole script
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import torch,triton,transformers as t;print('torch',torch.__version__,'triton',triton.__version__,'transformers',t.__version__)"
gpu_test_deps
echo "== compile tests on CUDA $(date -u +%T)"
T=$(( $(left) / 4 )); [ "$T" -gt 75 ] && T=75
timeout "$T" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
  tests/test_engine_compile.py tests/test_engine_gpu.py -k "cuda and compile" 2>&1 | tail -15
# the compiled run first (it compiles: the longer one), then the eager one in what is left
E2E=(--device cuda --workloads a --plan pk --repeat 2 --quiet --no-plot)
[ "${QUICK:-0}" = 1 ] && E2E=(--device cpu --tiny --workloads a --plan pk --repeat 1 --quiet --no-plot)
echo "== bench_e2e (a), --torch-compile $(date -u +%T)"
timeout $(( $(left) * 2 / 3 )) python3 benchmarks/bench_e2e.py "${E2E[@]}" --torch-compile \
  --out "$O/bench_e2e_compiled.json" 2>&1 | grep -v "^USDT" | grep -v "^pk_a {" | tail -12
echo "== bench_e2e (a), eager forward $(date -u +%T)"
timeout "$(left)" python3 benchmarks/bench_e2e.py "${E2E[@]}" \
  --out "$O/bench_e2e_eager.json" 2>&1 | grep -v "^USDT" | grep -v "^pk_a {" | tail -12
echo "== side by side $(date -u +%T)"
python3 - "$O/bench_e2e_eager.json" "$O/bench_e2e_compiled.json" <<'PY'
import json, sys
rows = {}
for name, path in zip(("eager", "compiled"), sys.argv[1:]):
    try:
        res = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(f"{name}: no result ({exc!r})")
        continue
    r = res.get("pk_a") or {}
    bd = r.get("breakdown") or {}
    rows[name] = r.get("tok_per_s")
    print(f"{name:9s} tok/s {r.get('tok_per_s')}  ms/step {r.get('step_ms')}  device ms/step "
          f"{bd.get('device_ms_per_step')}  setup {res.get('pk_setup_s')} s (warm-up "
          f"{res.get('pk_warmup_s')} s {res.get('pk_warmup', '')})  graphs {r.get('graphs')}  "
          f"compiled {r.get('compiled')}  error {res.get('pk_error', {}).get('error')}")
if rows.get("eager") and rows.get("compiled"):
    print(f"compiled / eager tok/s: {rows['compiled'] / rows['eager']:.3f}")
PY
echo "== end $(date -u +%T)"
