#!/usr/bin/env bash
# Phase B on a GPU machine (≤ 5 min): the benchmarks, each with its anchors measured in the
# same run, writing bench/results/<card>-<name>.json (card, versions, date) and the card's
# sparse/dense decision table (spamkern/sparse/measured/<card>.json).
#
#   bash bench/run_gpu_b.sh            # on the GPU machine, after phase A
#   bash bench/run_gpu_b.sh --quick    # CPU rehearsal: small sizes, CPU timings
#
# Which benchmarks run — a convention, so a new bench/bench_<name>.py needs no edit here:
#   * every bench/bench_<name>.py runs, in its own pytest process with its own time limit,
#     writing <card>-<name>.json (pytest-benchmark JSON plus a "spamkern_run" block);
#     a file without a GPU mode says so with a line `GPU_MODE = False` and is left out;
#   * on the GPU, where bench/run_<name>_gpu.py exists, that script runs instead (`--out DIR`:
#     it drives the pytest file itself and writes its own <card>-<name>.json); the CPU
#     rehearsal runs the pytest file;
#   * where bench/<name>_ratios.py exists, it is run on the JSON afterwards to print ratios.
# The sparse runner goes first: it writes the decision tables this card ships.
set -uo pipefail
BUDGET_S=${BUDGET_S:-290}
PHASE="phase B"
# shellcheck source=bench/run_gpu_common.sh
source "$(dirname "$0")/run_gpu_common.sh" "$@"
LOG="$OUT_DIR/phase-b.log"
: > "$LOG"
PER_FILE_S=${PER_FILE_S:-75}

install_wheels
if [ -z "$QUICK" ]; then
  extension_has_cuda || build_cuda_extension  # a fresh machine: phase A's build is gone
  export TRITON_INTERPRET=0
fi
describe_machine
# the card as the benchmarks name it (on the CPU they fix torch to 1 thread)
CARD=$("$PY" -c "
import torch
from spamkern.sparse import tables as t
gpu = torch.cuda.is_available()
gpu or torch.set_num_threads(1)
print(t.card_slug(t.card_name(torch.device('cuda' if gpu else 'cpu'))))")
log "card slug: $CARD"

run_bench() {  # run_bench NAME: one benchmark file by the convention above
  local name=$1 file="bench/bench_$1.py" runner="bench/run_$1_gpu.py"
  local json="$OUT_DIR/$CARD-$name.json"
  if grep -q "^GPU_MODE = False" "$file"; then
    log "=== $file: no GPU mode, left out"
    return
  fi
  if [ -f "$runner" ] && [ -z "$QUICK" ]; then
    local extra=()
    [ "$name" = sparse ] && [ -z "$QUICK" ] && extra=(--write-tables)
    step "bench: $name ($runner)" "$PER_FILE_S" "$PY" "$runner" --out "$OUT_DIR" \
      "${extra[@]}"
  else
    step "bench: $name ($file)" "$PER_FILE_S" "$PY" -m pytest -q -p no:cacheprovider "$file" \
      ${QUICK:+--quick} --benchmark-json="$json"
  fi
  if [ -f "bench/${name}_ratios.py" ] && [ -f "$json" ]; then
    "$PY" "bench/${name}_ratios.py" "$json" 2>&1 | tee -a "$LOG"
  fi
}

names=()
for f in bench/bench_*.py; do
  n=${f#bench/bench_}
  names+=("${n%.py}")
done
# sparse first (the decision tables), then the others in name order
run_bench sparse
for n in "${names[@]}"; do
  [ "$n" = sparse ] || run_bench "$n"
done
mkdir -p "$OUT_DIR/measured"
cp spamkern/sparse/measured/*.json "$OUT_DIR/measured/" 2> /dev/null || true
ls -la "$OUT_DIR" | tee -a "$LOG"
finish
