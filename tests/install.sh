#!/usr/bin/env bash
# What the gate needs, into the active Python environment (a fresh venv): torch 2.13.0 is
# the CPU build on local disk; the rest comes from PyPI, transformers at the OLDEST version
# the project supports (.ci/constraints.txt; pyproject.toml says why); verl's and mbridge's
# own code without their dependency trees (pyproject.toml's verl-ci extra lists what the
# imported modules need).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -c .ci/constraints.txt torch==2.13.0 -e '.[dev,verl-ci]'
pip install -q --no-deps verl==0.9.1 mbridge==0.15.1
