#!/usr/bin/env bash
# Compile individual sources the way the build does, without building the package:
#   scripts/check_compile.sh csrc/kernels/foo.cu csrc/python/bind_foo.cpp
# .cu -> nvcc for sm_90a with ptxas -v (registers, spills); .cpp -> host compiler with pybind11.
# GPTOSS_CHECK_ARCHS="80 89 90a" compiles the .cu files for those architectures instead (every kernel
# file must compile for sm_80..89 too: Hopper-only code behind arch.cuh's guards).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PY=${PYTHON:-.venv/bin/python}
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
out=$(mktemp -d)
for f in "$@"; do
  case "$f" in
    *.cu)
      gencode=()
      for a in ${GPTOSS_CHECK_ARCHS:-90a}; do gencode+=("-gencode=arch=compute_$a,code=sm_$a"); done
      "$NVCC" -std=c++17 "${gencode[@]}" -Icsrc -Icsrc/include --expt-relaxed-constexpr \
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
