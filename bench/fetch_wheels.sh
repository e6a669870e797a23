#!/usr/bin/env bash
# Download the pure-Python wheels laplace-torch needs into bench/wheels/, for GPU machines
# without network (carry the folder along; bench/run_gpu.sh installs them with --no-deps).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
pip download -q --no-deps --only-binary=:all: -d wheels \
  "laplace-torch==0.3" "asdfghjkl==0.1a4" backpack-for-pytorch "curvlinops-for-pytorch>=3.0.1" \
  unfoldNd einconv torchmetrics linear_operator einops opt-einsum lightning-utilities \
  jaxtyping wadler-lindig
du -sh wheels
