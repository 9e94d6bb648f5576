# Sourced by the benchmarks/gpu_*.sh scripts (run from the repository root): the lines
# they share. Functions:
#   gpu_env NAME DEFAULT_LIMIT [MARGIN]  LIMIT (seconds for the whole script: $LIMIT or
#       DEFAULT_LIMIT), T0, O (the output folder: $OUT or benchmarks/out), src/ on
#       PYTHONPATH, unbuffered Python, everything printed also appended to $O/NAME.log;
#       left() then prints the seconds left less MARGIN (default 5)
#   gpu_test_deps  pytest (and the other test wheels) from .whl/extra/ when python3 has none
#   gpu_flashinfer ARGS...  succeeds when FlashInfer's wheels are in .whl/ and ARGS hold no
#       --no-flashinfer; then installs them into /tmp/site (unless flashinfer imports
#       already) and sets CUDA_HOME and the environment of FlashInfer's JIT build

gpu_env() {
  LIMIT="${LIMIT:-$2}"; T0=$(date +%s); GPU_MARGIN="${3:-5}"
  O="${OUT:-benchmarks/out}"; mkdir -p "$O"
  export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  exec > >(tee -a "$O/$1.log") 2>&1
}

left() { echo $(( LIMIT - ($(date +%s) - T0) - GPU_MARGIN )); }

gpu_test_deps() {
  python3 -c "import pytest" 2>/dev/null || { ls .whl/extra/*.whl >/dev/null 2>&1 && \
    python3 -m pip install -q --no-index --no-deps --target /tmp/site_test .whl/extra/*.whl && \
    export PYTHONPATH="$PYTHONPATH:/tmp/site_test"; }
}

gpu_flashinfer() {
  ls .whl/flashinfer_python-*.whl >/dev/null 2>&1 && [[ " $* " != *" --no-flashinfer "* ]] \
    || return 1
  python3 -c "import flashinfer" 2>/dev/null || { python3 -m pip install -q --no-index \
    --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; }
  local nvcc; nvcc=$(readlink -f "$(command -v nvcc)")
  export CUDA_HOME; CUDA_HOME=$(dirname "$(dirname "$nvcc")")
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a
  export LIBRARY_PATH="$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
}
