#!/bin/bash
# On a GPU machine with any number of GPUs, from the repository root: the KVCacheGroup
# tests on the real devices (every ordered pair of cpu and cuda:i, cpu<->cuda both ways a
# move can stage; two GPUs add cuda:0 <-> cuda:1 and a three-member group) and the live
# migration tests (CUDA <-> CPU engines, two engines on one GPU, cuda:0 <-> cuda:1), then
# the move benchmark (1 GiB per pair, 8 GiB between two GPUs when memory allows; cpu<->cuda
# swept over direct / host staging, host threads and chunk sizes), then the migration
# benchmark (64 running requests moved between engines while both serve: pause per
# request, tok/s during vs without, token identity), in one go (~5 min, one GPU).
#   bash benchmarks/gpu_multi.sh [bench_move.py options]   (LIMIT=seconds, default 420;
#   MIGRATE_ARGS="..." for bench_migrate.py)
# Leaves NCCL / NVLink multicast settings as the machine has them (nothing here uses NCCL).
set -u
source benchmarks/_gpu_env.sh
gpu_env gpu_multi 420
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -12
python3 - <<'PY'
import os, torch
n = torch.cuda.device_count()
print("torch", torch.__version__, "gpus", n, "cpus", os.cpu_count(), "threads", torch.get_num_threads())
for i in range(n):
    for j in range(n):
        if i != j:
            print(f"peer access cuda:{i} -> cuda:{j}:", torch.cuda.can_device_access_peer(i, j))
PY
gpu_test_deps
EXTRA=""; python3 -c "import hypothesis" 2>/dev/null && EXTRA=tests/test_group_host_copy.py
echo "== group and migration tests on the devices $(date -u +%T)"
timeout "$(( $(left) / 3 ))" python3 -m pytest -q -p no:cacheprovider -rs -o addopts="" -s \
  --durations=5 tests/test_group_gpu.py tests/test_engine_migrate_gpu.py $EXTRA 2>&1 | tail -50
echo "== move benchmark $(date -u +%T)"
timeout "$(( $(left) / 2 ))" python3 benchmarks/bench_move.py "$@"
echo "== migration benchmark $(date -u +%T)"
timeout "$(left)" python3 benchmarks/bench_migrate.py ${MIGRATE_ARGS:-}
echo "== done in $(( $(date +%s) - T0 )) s"
