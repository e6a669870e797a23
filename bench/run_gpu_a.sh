#!/usr/bin/env bash
# Phase A on a GPU machine (≤ 4 min, correctness only): build spamkern._C with its CUDA
# kernels for sm_90, then every GPU test — Triton kernels compiled for the card, the CUDA
# kernel, cuSPARSELt 2:4, fp16/bf16 paths, masks on the device against the CPU. Nothing is
# timed here; phase B (bench/run_gpu_b.sh) measures.
#
#   bash bench/run_gpu_a.sh            # on the GPU machine (writes $OUT/phase-a.log)
#   bash bench/run_gpu_a.sh --quick    # CPU rehearsal: no build, Triton interpreted
#
# The tests run under tests/conftest.py's rule: a skip outside the gpu-marked tests fails.
set -uo pipefail
BUDGET_S=${BUDGET_S:-230}
PHASE="phase A"
# shellcheck source=bench/run_gpu_common.sh
source "$(dirname "$0")/run_gpu_common.sh" "$@"
LOG="$OUT_DIR/phase-a.log"
: > "$LOG"

install_wheels
if [ -z "$QUICK" ]; then
  build_cuda_extension
  extension_has_cuda || { log "the extension has no CUDA kernels: stopping"; status=1; finish; }
  export TRITON_INTERPRET=0
else
  export TRITON_INTERPRET=1
fi
describe_machine
# the kernel and sparse suites run whole (on a GPU they exercise the compiled kernels); the
# rest of the suite contributes its gpu-marked tests
step "GPU tests: kernels and sparse layers" 150 "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels tests/sparse --junitxml="$OUT_DIR/phase-a-kernels.xml"
step "GPU tests: gpu-marked tests elsewhere" 60 "$PY" -m pytest -q -p no:cacheprovider \
  tests -m gpu --ignore=tests/kernels --ignore=tests/sparse --ignore=tests/distributed \
  --junitxml="$OUT_DIR/phase-a-gpu-marked.xml"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | tail -n 40
finish
