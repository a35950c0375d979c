#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then the benchmark suite at the real 120b shapes
# (on a machine without a GPU: the reference path at reduced shapes, labelled as such).
# Extra arguments replace the default `bench all`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- bench all; fi
exec "${VENV:-.venv}/bin/gptoss-kernels" "$@"
