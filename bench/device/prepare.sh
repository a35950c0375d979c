#!/usr/bin/env bash
# Prepare the one-call device check. Runs HERE (no GPU needed, network for PyPI), fills the
# git-ignored folder .device/ that the device tool carries (carry: [".device"]):
#   .device/wheels/gptoss_kernels-*-cp312-*.whl   the package built for sm_90a with python 3.12
#   .device/wheels80/gptoss_kernels-*-cp312-*.whl the package built for sm_80 only (GPTOSS_CUDA_ARCHS=80:
#                  sm_80 machine code and compute_80 PTX, which the H100/H200's driver compiles), for
#                  run.sh's sm80 step: the sm_80..89 paths verified on the lent Hopper
#   .device/wheels/openai_harmony-*.whl + pydantic, pydantic_core, annotated_types,
#                  typing_inspection, typing_extensions (harmony's needs; the device has no network)
#   .device/vocab/o200k_base.tiktoken              the tokenizer file (TIKTOKEN_ENCODINGS_BASE)
#   .device/manifest.json                          commit, date, hash of the compiled sources
#
# usage: bash bench/device/prepare.sh            build and gather (a few minutes: nvcc, -j1)
#        bash bench/device/prepare.sh --check    check the tools and inputs, print the plan; builds nothing
# environment: GPTOSS_PY312 (python 3.12; default pyenv's 3.12.1), GPTOSS_VOCAB (vocab file),
#   GPTOSS_BUILD_VENV (cached build venv), GPTOSS_BUILD_JOBS (parallel compile jobs, default 1),
#   GPTOSS_HARMONY_VERSION (default 0.0.8), CUDACXX (nvcc).
set -euo pipefail

CHECK=0
case "${1:-}" in
  --check|--dry-run) CHECK=1 ;;
  "") ;;
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "prepare.sh: unknown argument '$1' (use --check or nothing)" >&2; exit 64 ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEV="$REPO/.device"
PYENV_ROOT_DIR="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
PY312="${GPTOSS_PY312:-$PYENV_ROOT_DIR/versions/3.12.1/bin/python}"
VOCAB="${GPTOSS_VOCAB:-$REPO/../shared/vocab/o200k_base.tiktoken}"
NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
HARMONY_VERSION="${GPTOSS_HARMONY_VERSION:-0.0.8}"
BUILD_VENV="${GPTOSS_BUILD_VENV:-$HOME/.cache/gptoss-kernels/py312-build}"
BUILD_DIR="${GPTOSS_WHEEL_BUILD_DIR:-/tmp/gptoss-kernels-wheel-build}"
JOBS="${GPTOSS_BUILD_JOBS:-1}"
MAX_MIB=56   # the device tool carries at most 64 MiB: .device plus the working tree

fail=0
ok()      { echo "ok:      $*"; }
missing() { echo "missing: $*"; fail=1; }

# ---- checks (both modes) ----
if [[ -x "$PY312" ]] && "$PY312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  ok "python 3.12: $PY312 ($("$PY312" -c 'import platform; print(platform.python_version())'))"
  if "$PY312" -m pip --version >/dev/null 2>&1; then ok "pip for python 3.12"; else missing "pip for $PY312"; fi
else
  missing "python 3.12 at $PY312 (set GPTOSS_PY312, or: pyenv install 3.12.1)"
fi
if [[ -x "$NVCC" ]]; then
  NVCC_VER="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
  if [[ -n "$NVCC_VER" ]] && awk -v v="$NVCC_VER" 'BEGIN { split(v, a, "."); exit !(a[1] > 12 || (a[1] == 12 && a[2] >= 4)) }'; then
    ok "nvcc $NVCC_VER: $NVCC (sm_90a needs >= 12.4)"
  else
    missing "nvcc >= 12.4 (found '${NVCC_VER:-?}' at $NVCC)"
  fi
else
  missing "nvcc (set CUDACXX or put it on PATH; looked at $NVCC)"
fi
if [[ -f "$VOCAB" ]]; then ok "vocab file: $VOCAB"; else missing "vocab file $VOCAB (set GPTOSS_VOCAB)"; fi
for f in pyproject.toml CMakeLists.txt bench/device/run.sh bench/device/helpers.py bench/device/sanitize_cases.py \
         bench/suite/conftest.py bench/suite/test_kernels.py; do
  if [[ -f "$REPO/$f" ]]; then ok "$f"; else missing "$REPO/$f"; fi
done
if git -C "$REPO" check-ignore -q .device/manifest.json 2>/dev/null; then
  ok ".device/ is ignored by git (it travels only through carry)"
else
  missing ".device/ ignored by git: add '/.device/' to .gitignore"
fi

echo
echo "plan: wheel  $DEV/wheels/gptoss_kernels-<version>-cp312-cp312-linux_x86_64.whl (GPTOSS_CUDA_ARCHS=90a, $JOBS job(s), build dir $BUILD_DIR)"
echo "      wheel  $DEV/wheels80/gptoss_kernels-<version>-cp312-cp312-linux_x86_64.whl (GPTOSS_CUDA_ARCHS=80, no host build; build dir ${BUILD_DIR}-sm80)"
echo "      wheels $DEV/wheels/openai_harmony-$HARMONY_VERSION-*.whl and its needs (pydantic, pydantic_core, ...)"
echo "      vocab  $DEV/vocab/$(basename "$VOCAB")"
echo "      $DEV/manifest.json"
echo "      then: run tool with command 'bash bench/device/run.sh \$OUT', carry [\".device\"], timeout_s 540"

if (( fail )); then
  echo "prepare.sh: missing prerequisites (above)" >&2
  exit 2
fi
if (( CHECK )); then
  echo "check passed (nothing built: run without --check to build)"
  exit 0
fi

# ---- build ----
echo
echo "== build venv (python 3.12 + scikit-build-core, pybind11, cmake, ninja): $BUILD_VENV"
if [[ ! -x "$BUILD_VENV/bin/python" ]]; then
  mkdir -p "$(dirname "$BUILD_VENV")"
  "$PY312" -m venv "$BUILD_VENV"
fi
"$BUILD_VENV/bin/python" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja

rm -rf "$DEV/wheels" "$DEV/wheels80" "$DEV/vocab" "$DEV/manifest.json"
mkdir -p "$DEV/wheels" "$DEV/wheels80" "$DEV/vocab"

echo "== wheel for sm_90a (nvcc -j$JOBS; takes a few minutes)"
t0=$(date +%s)
PATH="$BUILD_VENV/bin:$(dirname "$NVCC"):$PATH" GPTOSS_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
  "$BUILD_VENV/bin/python" -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation \
  --config-settings=build-dir="$BUILD_DIR" -w "$DEV/wheels" "$REPO"
echo "   built in $(( $(date +%s) - t0 )) s"
WHEEL="$(ls "$DEV"/wheels/gptoss_kernels-*.whl)"
"$BUILD_VENV/bin/python" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["gptoss_kernels/_build_info.py", "gptoss_kernels/libgptoss_kernels.so"]
bad = [n for n in need if n not in names] + ([] if any(n.startswith("gptoss_kernels/_C") and n.endswith(".so") for n in names) else ["gptoss_kernels/_C*.so"])
if bad:
    sys.exit(f"prepare.sh: the wheel lacks {bad} (a reference-only build?)")
info = zipfile.ZipFile(sys.argv[1]).read("gptoss_kernels/_build_info.py").decode()
if "REFERENCE_ONLY = True" in info or "90a" not in info:
    sys.exit(f"prepare.sh: the wheel is not an sm_90a kernel build:\n{info}")
print("   wheel ok:", sys.argv[1].rsplit("/", 1)[-1], "|", info.replace("\n", " "))
EOF

echo "== wheel for sm_80 only (the sm80 step: the pre-Hopper paths on the lent Hopper; nvcc -j$JOBS)"
t0=$(date +%s)
PATH="$BUILD_VENV/bin:$(dirname "$NVCC"):$PATH" GPTOSS_CUDA_ARCHS=80 GPTOSS_HOSTSIM=OFF CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
  "$BUILD_VENV/bin/python" -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation \
  --config-settings=build-dir="${BUILD_DIR}-sm80" -w "$DEV/wheels80" "$REPO"
echo "   built in $(( $(date +%s) - t0 )) s"
"$BUILD_VENV/bin/python" - "$(ls "$DEV"/wheels80/gptoss_kernels-*.whl)" <<'EOF'
import sys, zipfile
info = zipfile.ZipFile(sys.argv[1]).read("gptoss_kernels/_build_info.py").decode()
if 'CUDA_ARCHS = "80".split' not in info:
    sys.exit(f"prepare.sh: the sm_80 wheel is not an sm_80-only kernel build:\n{info}")
print("   wheel ok:", sys.argv[1].rsplit("/", 1)[-1], "|", info.replace("\n", " "))
EOF

echo "== openai-harmony $HARMONY_VERSION and its needs, for cp312 manylinux x86_64"
"$PY312" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEV/wheels" "openai-harmony==$HARMONY_VERSION"

echo "== vocab"
cp "$VOCAB" "$DEV/vocab/"

echo "== manifest"
"$PY312" "$REPO/bench/device/helpers.py" manifest "$REPO" "$DEV"

size_mib=$(( $(du -sb "$DEV" | cut -f1) / 1048576 ))
tree_mib=$(( $(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) / 1048576 ))
echo "== .device: ${size_mib} MiB; working tree (tracked + untracked, not ignored): ${tree_mib} MiB"
ls -la "$DEV/wheels" "$DEV/wheels80"
if (( size_mib + tree_mib > MAX_MIB )); then
  echo "prepare.sh: WARNING: ${size_mib} + ${tree_mib} MiB is near the device tool's 64 MiB limit" >&2
fi
echo "ready: run tool with command 'bash bench/device/run.sh \$OUT', carry [\".device\"], timeout_s 540"
