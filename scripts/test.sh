#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then every test. GPU tests are skipped with the
# reason when no GPU is present. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# run from outside the source tree so the installed package (not python/) is what is tested
exec "${VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider -rs --durations=15 tests "$@"
