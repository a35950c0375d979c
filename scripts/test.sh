#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then every test. Without a GPU the GPU tests run on
# the host build of the kernels (csrc/hostsim), except those that need the GPU itself (skipped with
# the reason). Then the kernels' tests once more on the sm_80..89 paths (GPTOSS_ARCH_OVERRIDE=80:
# the split router, the combine kernel, no PDL, no wgmma; on the host build, or on the GPU present),
# unless arguments select tests (they go to the first pytest) or GPTOSS_TEST_PRE_HOPPER=0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
rc=0
# run from outside the source tree so the installed package (not python/) is what is tested
"$PY" -m pytest -p no:cacheprovider -rs --durations=15 tests "$@" || rc=$?
if [ "$#" -eq 0 ] && [ "${GPTOSS_TEST_PRE_HOPPER:-1}" != 0 ]; then
  echo "== the kernels' tests on the sm_80..89 paths (GPTOSS_ARCH_OVERRIDE=80)"
  files=()
  for f in test_arch_paths test_mxfp4 test_dense test_rope test_router test_attention_decode test_attention_prefill \
           test_moe test_moe_prefill test_decode_step test_model test_custom_ops test_integration_transformers \
           test_c_api_example; do
    [ -f "tests/$f.py" ] && files+=("tests/$f.py")
  done
  GPTOSS_ARCH_OVERRIDE=80 "$PY" -m pytest -p no:cacheprovider -q -m gpu --durations=5 "${files[@]}" || rc=$?
fi
exit "$rc"
