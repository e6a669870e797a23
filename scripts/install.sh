#!/usr/bin/env bash
# Create (or refresh) the project virtualenv with everything the main job and the tests need.
# Idempotent: a stamp of the inputs skips work already done; the C++ extension is rebuilt
# when setup.py or csrc/ change.
#
#   VENV=.venv                      where the virtualenv lives
#   SPAMKERN_TORCH="torch==2.13.0"  the torch to install when the venv has none
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${SPAMKERN_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.spamkern-install"
inputs=$(cat scripts/install.sh setup.py pyproject.toml $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && python -c "import spamkern._C" 2>/dev/null; then
  exit 0
fi

echo "spamkern: installing into $VENV (first time takes a few minutes)"
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "$TORCH_SPEC" numpy
fi
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
constraints="$VENV/.constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
# triton: the version torch's own CUDA builds pin (3.7.1 for torch 2.13); numpy for its interpreter
pip install -q -c "$constraints" "triton==3.7.1" numpy scipy threadpoolctl tqdm matplotlib scikit-learn \
  pybind11 ninja setuptools wheel pytest pytest-benchmark ruff \
  einops opt-einsum packaging lightning-utilities "torch-pruning>=1.6,<2"
# laplace-torch (the reference implementation) without torchvision, which would replace torch
pip install -q --no-deps "laplace-torch==0.3" "asdfghjkl==0.1a4" backpack-for-pytorch \
  "curvlinops-for-pytorch>=3.0.1" unfoldNd einconv torchmetrics linear_operator
# spamkern itself, editable, compiled against the torch above (no isolated build env); the
# C++ extension is required here: a failed build stops the install (and so `make test`)
CFLAGS="${CFLAGS:--g0}" SPAMKERN_BUILD_EXT=1 pip install -q --no-build-isolation --no-deps -e .
python -c "import spamkern, spamkern._ext as e; assert e.AVAILABLE, e.LOAD_ERROR; print('spamkern', spamkern.__version__, '| C++ extension: loaded (' + str(e.cpu_isa()) + ')')"
echo "$inputs" > "$stamp"
