#!/usr/bin/env bash
# Everything measured on a GPU machine, in one prepared script:
#   1. build spamkern._C with its CUDA kernels against the machine's torch (editable install);
#   2. run the GPU tests (Triton compiled for the card, CUDA extension, float64 checks);
#   3. run the benchmarks: curvature (BENCH.md §1), sparse inference (§2), laplace backend;
#   4. copy the results (JSON with card, versions, date; PNGs; per-card decision tables)
#      to $OUT (the device tool's output folder) or bench/results.
#
#   bash bench/run_gpu.sh            # on the GPU machine
#   bash bench/run_gpu.sh --quick    # CPU smoke test of the whole pipeline (small sizes)
#
# laplace-torch and its pure-Python dependencies must be present; on a machine without
# network put their wheels in bench/wheels/ first (see bench/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR" bench/results
LOG="$OUT_DIR/run_gpu.log"
: > "$LOG"
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, never stop the whole script
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
}

if ls bench/wheels/*.whl > /dev/null 2>&1; then
  step "install laplace-torch wheels" 120 pip install -q --no-deps bench/wheels/*.whl
fi
if [ -z "$QUICK" ]; then
  step "build extension (CUDA)" 300 env SPAMKERN_BUILD_CUDA=1 SPAMKERN_BUILD_EXT=1 \
    SPAMKERN_CUDA_ARCHS="${SPAMKERN_CUDA_ARCHS:-90}" MAX_JOBS=16 \
    pip install -q --no-build-isolation --no-deps -e .
fi
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch, spamkern._ext as e
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print("extension", "loaded, CUDA kernels: %s" % e.HAS_CUDA_KERNELS if e.AVAILABLE else e.LOAD_ERROR)
PY
if [ -z "$QUICK" ]; then
  step "GPU tests" 240 python -m pytest -q -x tests/sparse tests/kernels tests/core -m "not slow"
  step "bench: sparse inference" 300 python bench/run_sparse_gpu.py --write-tables --out "$OUT_DIR"
  step "bench: curvature" 300 python bench/run_curvature_gpu.py --out "$OUT_DIR"
  step "bench: end-to-end training" 240 python -m pytest -q bench/bench_training.py \
    --benchmark-json "$OUT_DIR/training-benchmark.json"
  python bench/training_ratios.py "$OUT_DIR/training-benchmark.json" 2>&1 | tee -a "$LOG"
  step "bench: laplace backend" 120 python -m pytest -q bench/bench_laplace_backend.py \
    --benchmark-json "$OUT_DIR/laplace-backend-benchmark.json"
else
  # run_sparse_gpu.py needs a GPU; on the CPU its pytest-benchmark suite covers the C++ kernel
  step "bench: sparse inference (CPU)" 600 python -m pytest -q bench/bench_sparse.py \
    --benchmark-json "$OUT_DIR/cpu-sparse-benchmark.json"
  step "bench: curvature (quick)" 600 python bench/run_curvature_gpu.py --quick --out "$OUT_DIR"
  step "bench: end-to-end training (quick)" 300 python -m pytest -q bench/bench_training.py \
    --quick --benchmark-json "$OUT_DIR/training-benchmark-quick.json"
  python bench/training_ratios.py "$OUT_DIR/training-benchmark-quick.json" 2>&1 | tee -a "$LOG"
fi
cp -r spamkern/sparse/measured "$OUT_DIR/" 2>/dev/null || true
echo "results in $OUT_DIR (status $status)" | tee -a "$LOG"
exit $status
