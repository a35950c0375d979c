#!/usr/bin/env bash
# The one-call device check. Runs ON the GPU machine through the device tool:
#     run(command="bash bench/device/run.sh $OUT", carry=[".device"], timeout_s=540)
# after `bash bench/device/prepare.sh` here. No network there. Every step is time-capped so one
# hang cannot eat the call; the whole script keeps to GPTOSS_CHECK_BUDGET_S (default 470 s).
#
# Steps: install the prepared wheel into a target dir on PYTHONPATH (build from source there if
# the wheel does not load or the C++/CUDA sources changed since prepare, and say so) -> info ->
# every GPU test (pytest -m gpu -rs) -> compute-sanitizer memcheck and racecheck on
# bench/device/sanitize_cases.py -> sm80: the sm_80-only wheel (compute_80 PTX, compiled by the
# driver for this Hopper), info, then the GPU tests with GPTOSS_ARCH_OVERRIDE=80 (the sm_80..89
# paths: split router, combine kernel, no PDL, no wgmma), time-boxed to leave the benchmarks
# their share -> `gptoss-kernels bench all --json` -> the pytest-benchmark suite (bench/suite,
# --gk-quick, --benchmark-json; compared with the last saved run on this card,
# --benchmark-compare-fail median:10%) -> summary.md.
# Files in OUT (9): summary.md run.log info.json pytest.log sanitizer.log pytest_sm80.log bench.log
# bench.json suite.json (the suite's output is in bench.log, after the CLI's).
# Knobs: GPTOSS_CHECK_STEPS (default "pytest,memcheck,racecheck,sm80,bench,suite"), GPTOSS_BENCH_ARGS
# (default "all"; e.g. "e2e"), GPTOSS_SUITE_ARGS (default "--gk-quick"; e.g. "--gk-quick -k moe"),
# GPTOSS_SUITE_COMPARE_FAIL (default "median:10%"), GPTOSS_CHECK_BUDGET_S (default 470).
set -uo pipefail

OUT="${1:?usage: bash bench/device/run.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEV="$REPO/.device"
BUDGET="${GPTOSS_CHECK_BUDGET_S:-470}"
STEPS_WANTED=",${GPTOSS_CHECK_STEPS:-pytest,memcheck,racecheck,sm80,bench,suite},"   # e.g. GPTOSS_CHECK_STEPS=bench
BENCH_ARGS="${GPTOSS_BENCH_ARGS:-all}"                                   # e.g. GPTOSS_BENCH_ARGS="e2e --quick"
SUITE_ARGS="${GPTOSS_SUITE_ARGS:---gk-quick}"                           # pytest arguments of the suite step
SUITE_FAIL="${GPTOSS_SUITE_COMPARE_FAIL:-median:10%}"                   # a regression against the last run on this card
PY="${PYTHON:-python3}"
WORK="${GPTOSS_CHECK_WORK:-/tmp/gptoss-check}"                           # scratch (emptied first)
SITE="$WORK/site"
STEPS="$WORK/steps.tsv"
T0=$(date +%s)
rm -rf "$WORK" && mkdir -p "$WORK"
: > "$STEPS"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$REPO"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# cap WANTED RESERVE: seconds for a step, leaving RESERVE for the steps after it (0 = skip)
cap() { local l=$(( $(left) - $2 )); (( l > $1 )) && l=$1; (( l < 15 )) && l=0; echo $l; }
step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STEPS"; echo "== step $1: $2 (${3}s) ${4:-}"; }
verdict() { case $1 in 0) echo pass ;; 124|137) echo "TIMED OUT" ;; *) echo "fail (rc $1)" ;; esac; }

main() {
echo "== device check: $(date -u +%FT%TZ) repo $REPO budget ${BUDGET}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | head -3
$PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'

# ---- 1. install ----
t=$(date +%s)
if [[ -f "$DEV/manifest.json" ]]; then
  export GPTOSS_GIT_COMMIT="$($PY bench/device/helpers.py manifest-get "$DEV" git_commit)"
  export GPTOSS_GIT_DIRTY="$($PY bench/device/helpers.py manifest-get "$DEV" git_dirty)"
  echo "prepared: $($PY bench/device/helpers.py manifest-get "$DEV" prepared) commit $GPTOSS_GIT_COMMIT dirty=$GPTOSS_GIT_DIRTY"
fi
install_deps() {  # harmony and its needs, in one pip call; keep the device's own typing_extensions
  local w skip="" wheels=()
  $PY -c 'import typing_extensions' 2>/dev/null && skip="typing_extensions-"
  for w in "$DEV"/wheels/*.whl; do
    [[ -e "$w" ]] || continue
    case "$(basename "$w")" in gptoss_kernels-*) continue ;; esac
    [[ -n "$skip" && "$(basename "$w")" == $skip* ]] && continue
    wheels+=("$w")
  done
  (( ${#wheels[@]} )) || { echo "WARNING: no dependency wheels in .device/wheels (openai-harmony tests will fail)"; return; }
  $PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$1" "${wheels[@]}" \
    || echo "WARNING: could not install ${wheels[*]##*/}"
}
kernels_load() { PYTHONPATH="$1" $PY -c '
import gptoss_kernels as g, sys
if not g.cuda_available():
    sys.exit(f"kernels not usable: {g.kernels_error()}")
print("kernels load:", g.build_info())'; }
how="wheel"; why=""
WHEEL="$(ls "$DEV"/wheels/gptoss_kernels-*.whl 2>/dev/null | head -1)"
if [[ -z "$WHEEL" ]]; then
  how="source build"; why="no prepared wheel in .device/wheels (run bench/device/prepare.sh here first)"
else
  if ! err="$($PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" "$WHEEL" 2>&1)"; then
    echo "$err"
    err="the prepared wheel does not install here: $(echo "$err" | grep -v '^\s*$' | tail -1)"
  else
    err=""
    # Python sources as they are now (the wheel holds them as they were at prepare time)
    (cd python && find gptoss_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} "$SITE/" \;)
  fi
  now="$($PY bench/device/helpers.py source-hash "$REPO")"
  then_="$($PY bench/device/helpers.py manifest-get "$DEV" source_hash)"
  if [[ -n "$err" ]]; then
    how="source build"; why="$err"
  elif [[ "$now" != "$then_" ]]; then
    how="source build"; why="csrc/, CMakeLists.txt or pyproject.toml changed since prepare (the wheel is stale)"
  elif ! err="$(kernels_load "$SITE" 2>&1)"; then
    how="source build"; why="the prepared wheel does not load here: $(echo "$err" | tail -1)"
  else
    echo "$err"
  fi
fi
if [[ "$how" == "source build" ]]; then
  echo "FALLBACK: building from source on the device because $why"
  rm -rf "$SITE" && mkdir -p "$SITE"
  c=$(cap 240 200)
  if [[ -n "${GPTOSS_CHECK_NO_BUILD:-}" ]]; then
    echo "GPTOSS_CHECK_NO_BUILD is set: no source build (a dry run of this script)"
  elif (( c > 0 )); then
    GPTOSS_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "$c" $PY -m pip install -q --no-index --no-deps \
      --no-build-isolation --no-compile --disable-pip-version-check --target "$SITE" \
      --config-settings=build-dir="$WORK/build" "$REPO" 2>&1 | tail -40
    kernels_load "$SITE" || echo "ERROR: the source build does not load either"
  fi
fi
install_deps "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -f "$DEV/vocab/o200k_base.tiktoken" ]]; then
  export TIKTOKEN_ENCODINGS_BASE="$DEV/vocab"
else
  echo "WARNING: .device/vocab/o200k_base.tiktoken missing: harmony tests will fail or skip"
fi
if kernels_load "$SITE" >/dev/null 2>&1; then r=0; else r=1; fi
step install "$([[ $r == 0 ]] && echo "kernels load" || echo "KERNELS DO NOT LOAD")" $(( $(date +%s) - t )) "$how${why:+: $why}"

# ---- 2. info ----
t=$(date +%s)
timeout 60 $PY -m gptoss_kernels.cli info --json > "$OUT/info.json" 2>&1; r=$?
timeout 60 $PY -m gptoss_kernels.cli info 2>&1
step info "$(verdict $r)" $(( $(date +%s) - t ))

# ---- 3. GPU tests ----
t=$(date +%s)
c=$(cap 170 230)
if [[ "$STEPS_WANTED" != *,pytest,* ]]; then
  step "pytest -m gpu" "not asked for (GPTOSS_CHECK_STEPS)" 0
elif (( c > 0 )); then
  extra=()
  $PY -c 'import pytest_timeout' 2>/dev/null && extra=(--timeout=90)
  # Files in the order of bench/RESULTS.md ("the first GPU run"): the most fundamental kernels first,
  # so that a run cut by the time cap has checked what matters most; -v writes one line per test as
  # it finishes, so a killed run still shows which tests passed.
  order=(test_mxfp4 test_dense test_rope test_router test_attention_decode test_attention_prefill test_moe
         test_moe_prefill test_model test_decode_step test_c_api_example test_custom_ops test_integration_transformers)
  files=()
  for f in "${order[@]}"; do [[ -f "tests/$f.py" ]] && files+=("tests/$f.py"); done
  for f in tests/test_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done
  timeout "$c" $PY -m pytest -m gpu -rs -v --durations=25 -p no:cacheprovider "${extra[@]}" "${files[@]}" > "$OUT/pytest.log" 2>&1; r=$?
  tail -5 "$OUT/pytest.log"
  case $r in 0) v=pass ;; 5) v="no GPU tests collected" ;; 124|137) v="TIMED OUT after ${c}s" ;; *) v="failures (rc $r)" ;; esac
  step "pytest -m gpu" "$v" $(( $(date +%s) - t ))
else
  step "pytest -m gpu" "SKIPPED: no time left" 0
fi

# ---- 4. compute-sanitizer ----
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
for tool in memcheck racecheck; do
  t=$(date +%s)
  c=$(cap 70 150)
  if [[ "$STEPS_WANTED" != *,$tool,* ]]; then step "$tool" "not asked for (GPTOSS_CHECK_STEPS)" 0; continue; fi
  if [[ ! -x "$SAN" ]]; then step "$tool" "SKIPPED: compute-sanitizer not found" 0; continue; fi
  if (( c == 0 )); then step "$tool" "SKIPPED: no time left" 0; continue; fi
  echo "===== $tool step: start" >> "$OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$c" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 30 \
    $PY bench/device/sanitize_cases.py >> "$OUT/sanitizer.log" 2>&1; r=$?
  case $r in 0) v="clean" ;; 86) v="ERRORS FOUND" ;; 124|137) v="TIMED OUT after ${c}s" ;; *) v="fail (rc $r)" ;; esac
  step "$tool" "$v" $(( $(date +%s) - t ))
done

# ---- 5. the sm_80 build on this Hopper: the sm_80..89 paths ----
t=$(date +%s)
if [[ "$STEPS_WANTED" == *,bench,* ]]; then
  c=$(cap 110 120)   # at most 110 s, leaving the benchmarks at least 120 s
else
  c=$(cap 400 20)    # alone (GPTOSS_CHECK_STEPS=sm80): what the budget has
fi
WHEEL80="$(ls "$DEV"/wheels80/gptoss_kernels-*.whl 2>/dev/null | head -1)"
if [[ "$STEPS_WANTED" != *,sm80,* ]]; then
  step "sm80 build, pytest -m gpu" "not asked for (GPTOSS_CHECK_STEPS)" 0
elif [[ -z "$WHEEL80" ]]; then
  step "sm80 build, pytest -m gpu" "SKIPPED: no sm_80 wheel in .device/wheels80 (run bench/device/prepare.sh)" 0
elif [[ "$($PY bench/device/helpers.py source-hash "$REPO")" != "$($PY bench/device/helpers.py manifest-get "$DEV" source_hash)" ]]; then
  step "sm80 build, pytest -m gpu" "SKIPPED: the sm_80 wheel is stale (csrc/, CMakeLists.txt or pyproject.toml changed since prepare)" 0
elif (( c == 0 )); then
  step "sm80 build, pytest -m gpu" "SKIPPED: no time left" 0
else
  SITE80="$WORK/site80"
  if $PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE80" "$WHEEL80" \
       > "$OUT/pytest_sm80.log" 2>&1; then
    (cd python && find gptoss_kernels -name '*.py' ! -name _build_info.py -exec cp --parents {} "$SITE80/" \;)
    install_deps "$SITE80" >> "$OUT/pytest_sm80.log" 2>&1
    export CUDA_CACHE_MAXSIZE=4294967296   # the driver compiles the compute_80 PTX once, then from its cache
    {
      echo "== info: the sm_80 build on this device, no override (the paths follow the code it runs: sm_80's)"
      PYTHONPATH="$SITE80" timeout 90 $PY -m gptoss_kernels.cli info
      echo "== pytest -m gpu, GPTOSS_ARCH_OVERRIDE=80 (the sm_80..89 paths forced as well), ${c}s at most"
    } >> "$OUT/pytest_sm80.log" 2>&1
    note="$(grep -o "sm_80 paths ([^)]*)" "$OUT/pytest_sm80.log" | head -1)"
    extra=()
    $PY -c 'import pytest_timeout' 2>/dev/null && extra=(--timeout=60)
    files80=()
    for f in test_arch_paths test_mxfp4 test_dense test_rope test_router test_attention_decode test_attention_prefill \
             test_moe test_moe_prefill test_decode_step test_model test_custom_ops; do
      [[ -f "tests/$f.py" ]] && files80+=("tests/$f.py")
    done
    PYTHONPATH="$SITE80" GPTOSS_ARCH_OVERRIDE=80 timeout "$c" $PY -m pytest -m gpu -rs -v -p no:cacheprovider \
      "${extra[@]}" "${files80[@]}" >> "$OUT/pytest_sm80.log" 2>&1; r=$?
    tail -3 "$OUT/pytest_sm80.log"
    case $r in 0) v=pass ;; 5) v="no GPU tests collected" ;; 124|137) v="TIMED OUT after ${c}s (the log has the tests that ran)" ;; *) v="failures (rc $r)" ;; esac
    step "sm80 build, pytest -m gpu" "$v" $(( $(date +%s) - t )) "${note:-info did not show sm_80 paths}"
  else
    step "sm80 build, pytest -m gpu" "fail: the sm_80 wheel does not install" $(( $(date +%s) - t ))
  fi
fi

# ---- 6. benchmarks ----
t=$(date +%s)
# the suite step after this one gets 2/5 of what is left (at most 110 s), the CLI the rest
share=0
if [[ "$STEPS_WANTED" == *,suite,* ]]; then share=$(( ($(left) - 20) * 2 / 5 )); (( share > 110 )) && share=110; (( share < 0 )) && share=0; fi
c=$(cap 400 $(( 20 + share )))
if [[ "$STEPS_WANTED" != *,bench,* ]]; then
  step "bench $BENCH_ARGS" "not asked for (GPTOSS_CHECK_STEPS)" 0
elif (( c > 0 )); then
  # shellcheck disable=SC2086 - BENCH_ARGS is a list of words
  timeout "$c" $PY -m gptoss_kernels.cli bench $BENCH_ARGS --json "$WORK/bench.json" --max-seconds $(( c > 45 ? c - 45 : 0 )) \
    > "$OUT/bench.log" 2>&1; r=$?
  [[ -f "$WORK/bench.json" ]] && cp "$WORK/bench.json" "$OUT/bench.json"
  case $r in 0) v=pass ;; 1) v="some cases failed verification or raised" ;; 124|137) v="TIMED OUT after ${c}s (partial JSON kept)" ;; *) v="fail (rc $r)" ;; esac
  step "bench $BENCH_ARGS" "$v" $(( $(date +%s) - t ))
else
  step "bench $BENCH_ARGS" "SKIPPED: no time left" 0
fi

# ---- 7. the pytest-benchmark suite: the CLI's cases again, device time per call in pytest-benchmark's
# JSON (suite.json; saved beside bench.json by `helpers.py save`), compared with the last saved run on
# this card. Time-boxed twice: --gk-max-seconds skips the cases that would start late (the JSON is
# still written), `timeout` stops the rest. A regression or a failure here does not stop the summary.
t=$(date +%s)
c=$(cap 110 10)
if [[ "$STEPS_WANTED" != *,suite,* ]]; then
  step "suite" "not asked for (GPTOSS_CHECK_STEPS)" 0
elif ! $PY -c 'import pytest_benchmark' 2>/dev/null; then
  step "suite" "SKIPPED: pytest-benchmark is not installed here" 0
elif (( c > 0 )); then
  card="" prev=""   # the card as torch names it, as the suite's JSON records it
  command -v nvidia-smi >/dev/null && card="$($PY -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
  [[ -n "$card" ]] && prev="$($PY bench/device/helpers.py last-suite "$REPO" "$card" 2>/dev/null)"
  cmp=()
  [[ -n "$prev" ]] && cmp=("--benchmark-compare=$prev" "--benchmark-compare-fail=$SUITE_FAIL")
  echo "===== pytest-benchmark suite: bench/suite $SUITE_ARGS${prev:+ (compared with $prev, $SUITE_FAIL)}" >> "$OUT/bench.log"
  # shellcheck disable=SC2086 - SUITE_ARGS is a list of words
  timeout "$c" $PY -m pytest bench/suite -p no:cacheprovider -q -rs $SUITE_ARGS --gk-max-seconds $(( c > 60 ? c - 35 : c / 2 )) \
    --benchmark-storage="$WORK/benchmarks" --benchmark-json="$WORK/suite.json" "${cmp[@]}" >> "$OUT/bench.log" 2>&1; r=$?
  [[ -s "$WORK/suite.json" ]] && cp "$WORK/suite.json" "$OUT/suite.json"
  if sed -n '/===== pytest-benchmark suite/,$p' "$OUT/bench.log" | grep -q "Performance has regressed"; then
    v="REGRESSION: a median over ${SUITE_FAIL#*:} slower than the last run on this card (bench.log)"
  else
    case $r in 0) v=pass; [[ -s "$OUT/suite.json" ]] || v="pass, nothing timed (every case skipped: bench.log)" ;;
      1) v="some cases failed (verification or error)" ;; 5) v="no tests collected" ;;
      124|137) v="TIMED OUT after ${c}s (no JSON)" ;; *) v="fail (rc $r)" ;; esac
  fi
  step "suite" "$v" $(( $(date +%s) - t )) "${prev:+vs $(basename "$prev")}"
else
  step "suite" "SKIPPED: no time left" 0
fi

# ---- 8. summary ----
$PY bench/device/helpers.py summary "$OUT" --steps "$STEPS" > "$OUT/summary.md" 2>&1
echo
cat "$OUT/summary.md"
echo "== device check done in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/run.log"
