#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then every test. Without a GPU the GPU tests run on
# the host build of the kernels (csrc/hostsim), except those that need the GPU itself (skipped with
# the reason). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# run from outside the source tree so the installed package (not python/) is what is tested
exec "${VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider -rs --durations=15 tests "$@"
