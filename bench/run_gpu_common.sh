# Shared by bench/run_gpu_a.sh and bench/run_gpu_b.sh (sourced, not run).
#   QUICK         "--quick" for the CPU rehearsal, "" on the GPU machine
#   OUT_DIR       where logs and results go ($OUT on the device tool, else bench/results)
#   BUDGET_S      the phase's time budget; every step gets at most what is left of it
# shellcheck shell=bash
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
# the CPU rehearsal checks that every step runs end to end on a slow, shared CPU: it gets
# time limits of its own (the GPU budgets are for the GPU)
if [ -n "$QUICK" ]; then
  BUDGET_S=${REHEARSAL_BUDGET_S:-1800}
  PER_FILE_S=${REHEARSAL_PER_FILE_S:-900}
fi
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
PHASE_START=$SECONDS
status=0
PY=${PYTHON:-python}

log() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME CAP_S COMMAND...: run with min(CAP_S, budget left) seconds, log, go on
  local name=$1 cap=$2
  shift 2
  [ -n "$QUICK" ] && cap=$PER_FILE_S
  local left=$((BUDGET_S - (SECONDS - PHASE_START) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    log "=== $name: SKIPPED, the phase's ${BUDGET_S} s budget is spent"
    status=1
    return
  fi
  local t0=$SECONDS
  log "=== $name (limit ${limit} s)"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  log "=== $name: rc=$rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  [ $rc -eq 0 ] || status=1
}

install_wheels() {  # laplace-torch and its pure-Python needs, carried in bench/wheels/
  if ls bench/wheels/*.whl > /dev/null 2>&1; then
    step "install carried wheels (offline)" 60 "$PY" -m pip install -q --no-index --no-deps \
      bench/wheels/*.whl
  elif [ -z "$QUICK" ]; then
    log "=== no bench/wheels/: laplace-torch anchors need 'bash bench/fetch_wheels.sh' first"
  fi
}

extension_has_cuda() {
  "$PY" -c "import sys, spamkern._ext as e; sys.exit(0 if e.HAS_CUDA_KERNELS else 1)" \
    2> /dev/null
}

build_cuda_extension() {  # spamkern._C with the CUDA kernels for sm_90, against this torch
  step "build extension (C++ + CUDA sm_${SPAMKERN_CUDA_ARCHS:-90})" 180 env \
    SPAMKERN_BUILD_EXT=1 SPAMKERN_BUILD_CUDA=1 SPAMKERN_CUDA_ARCHS="${SPAMKERN_CUDA_ARCHS:-90}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
}

describe_machine() {
  "$PY" - << 'PY' 2>&1 | tee -a "$LOG"
import torch, spamkern._ext as e
from spamkern import dispatch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print("extension:", ("loaded, CUDA kernels: %s" % e.HAS_CUDA_KERNELS) if e.AVAILABLE
      else e.LOAD_ERROR)
print("bsr_linear backends:", dispatch.available_backends("bsr_linear"),
      "load errors:", dispatch.load_errors())
PY
}

finish() {
  log "$PHASE: status $status after $((SECONDS - PHASE_START)) s; results in $OUT_DIR"
  exit $status
}
