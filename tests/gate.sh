#!/usr/bin/env bash
# The pre-merge gate: every CPU test, at every world size the integration layouts use.
# Run from the repository root in an environment with `pip install -e '.[dev]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# Each torchrun rank gets one intra-op thread: 2 or 4 ranks share 2 cores.
export OMP_NUM_THREADS=1
step() { echo; echo "== $*"; start=$SECONDS; "$@"; echo "== done in $((SECONDS - start)) s"; }
step ruff check .
step pytest -n auto -q -p no:cacheprovider tests/unit tests/static tests/integration
step torchrun --standalone --nproc-per-node 2 -m pytest -q -p no:cacheprovider tests/integration
step torchrun --standalone --nproc-per-node 4 -m pytest -q -p no:cacheprovider tests/integration
