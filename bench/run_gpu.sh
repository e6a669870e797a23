#!/usr/bin/env bash
# Everything measured on a GPU machine: phase A (build + GPU tests, bench/run_gpu_a.sh) then
# phase B (benchmarks + decision tables, bench/run_gpu_b.sh). On a machine lent for a few
# minutes per call, run the phases as separate calls instead (each fits one).
#
#   bash bench/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
bash bench/run_gpu_a.sh "$@"
a=$?
bash bench/run_gpu_b.sh "$@"
b=$?
exit $((a || b))
