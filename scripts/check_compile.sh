#!/usr/bin/env bash
# Compile individual sources the way the build does, without building the package:
#   scripts/check_compile.sh csrc/kernels/foo.cu csrc/python/bind_foo.cpp
# .cu -> nvcc for sm_90a with ptxas -v (registers, spills); .cpp -> host compiler with pybind11.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PY=${PYTHON:-.venv/bin/python}
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
out=$(mktemp -d)
for f in "$@"; do
  case "$f" in
    *.cu)
      "$NVCC" -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/include --expt-relaxed-constexpr \
        -lineinfo -Xptxas=-v -Xcompiler=-fPIC -c "$f" -o "$out/$(basename "$f").o" ;;
    *.cpp)
      c++ -std=c++17 -fPIC -fsyntax-only -Icsrc -Icsrc/include -I"$CUDA_INC" \
        $("$PY" -m pybind11 --includes) "$f" ;;
    *.h)
      cc -std=c99 -fsyntax-only -Icsrc/include -I"$CUDA_INC" -x c "$f"
      c++ -std=c++17 -fsyntax-only -Icsrc/include -I"$CUDA_INC" -x c++ "$f" ;;
    *) echo "skip $f" ;;
  esac
  echo "ok: $f"
done
rm -rf "$out"
