#!/usr/bin/env bash
# Build the C-ABI demo against the installed gptoss-kernels library.
#   bash examples/c_api/build.sh [OUTPUT]     (default examples/c_api/demo)
# Needs: a C++17 compiler, the CUDA toolkit's headers and cudart (CUDA_HOME, default /usr/local/cuda),
# and gptoss_kernels installed for PYTHON (default python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/demo}
PY=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
lib=$("$PY" -c "import gptoss_kernels as g; print(g.library_path())")
inc=$("$PY" -c "import gptoss_kernels as g; print(g.include_path())")
libdir=$(dirname "$lib")
${CXX:-c++} -std=c++17 -O2 -Wall "$here/demo.cpp" -o "$out" -I"$inc" -I"$CUDA_HOME/include" \
  -L"$libdir" -lgptoss_kernels -Wl,-rpath,"$libdir" \
  -L"$CUDA_HOME/lib64" -lcudart_static -ldl -lpthread -lrt
echo "built $out (library $lib)"
