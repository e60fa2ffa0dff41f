#!/usr/bin/env bash
# transformers' own common model tests (ModelTesterMixin, ConfigTester and, where the
# source distribution has it, GenerationTesterMixin) on the oracle's Hugging Face classes,
# for the transformers version installed in the active environment. On demand, not in the
# gate (minutes on 2 cores). Usage, from anywhere in the repository:
#     bash tests/hf_common/run.sh [PYTEST ARGS...]        e.g. -k sdpa, -x, -q
# Fetches that version's source distribution with pip into a temporary directory (removed
# at exit; nothing is copied into this repository), places tests/hf_common/common_tests.py
# in its test tree and runs pytest there. The sdist ships the common test modules but not
# every module they import: those it lacks are replaced by empty stand-ins, so the tests
# defined in them (generation's, export's) do not run; the script says which.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
version=$(python -c "import transformers; print(transformers.__version__)")
work=$(mktemp -d "${TMPDIR:-/tmp}/splitllama-hf-common-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "transformers $version: fetching its source distribution into $work"
python -m pip download -q --no-binary :all: --no-deps "transformers==$version" -d "$work"
tar xzf "$work/transformers-$version.tar.gz" -C "$work"
tree="$work/transformers-$version/tests"
# what transformers' test modules import beyond transformers itself, kept out of the venv
python -m pip install -q --target "$work/deps" parameterized
mkdir -p "$tree/models/custom_split_llama"
touch "$tree/__init__.py" "$tree/models/__init__.py" "$tree/models/custom_split_llama/__init__.py"
stand_in() {  # stand_in MODULE_PATH PYTHON: an empty stand-in for a module the sdist lacks
  if [ ! -f "$tree/$1" ]; then
    mkdir -p "$tree/$(dirname "$1")"
    touch "$tree/$(dirname "$1")/__init__.py"
    printf '%s\n' "$2" > "$tree/$1"
    echo "not in the sdist, stand-in used (its tests do not run): tests/$1"
  fi
}
stand_in generation/test_utils.py "class GenerationTesterMixin: pass"
stand_in exporters/test_export.py "class ExportTesterMixin: pass"
stand_in utils/test_configuration_utils.py "config_common_kwargs = {}"
cp "$repo/tests/hf_common/common_tests.py" "$tree/models/custom_split_llama/test_modeling_custom_split_llama.py"
cd "$work/transformers-$version"
PYTHONPATH="$work/deps${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -p no:cacheprovider -p no:xdist \
  -o addopts= tests/models/custom_split_llama "$@"
