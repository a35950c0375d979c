#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install gptoss-kernels with its test extras.
#   VENV=.venv (default)   PYTHON=python3   TORCH_SPEC="torch==2.13.0"   GPTOSS_REFERENCE_ONLY=1 (no kernels)
#   GPTOSS_CUDA_ARCHS="80;89;90a" (the cards to build for; default auto: this machine's GPUs and 90a)
# A python that already has torch >= 2.11 (e.g. a GPU machine's) is reused through
# --system-site-packages instead of installing another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv --system-site-packages "$VENV"
fi
V="$VENV/bin/python"
pipi() { "$V" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$V" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  pipi "${TORCH_SPEC:-torch==2.13.0}"
fi
# nvcc: CUDACXX, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin (CMake searches the same, this is for the message)
if [ -z "${GPTOSS_REFERENCE_ONLY:-}" ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null \
   && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "[setup] nvcc not found: set CUDA_HOME or CUDACXX, or GPTOSS_REFERENCE_ONLY=1 for a build without kernels" >&2
  exit 1
fi
echo "[setup] build requirements"
pipi "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja
echo "[setup] building and installing gptoss-kernels (CUDA kernels for ${GPTOSS_CUDA_ARCHS:-auto: the GPUs of this machine and 90a}; a few minutes on 2 cores)"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} pipi --no-build-isolation ".[test]"
"$VENV/bin/gptoss-kernels" info
