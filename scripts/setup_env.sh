# Shared by scripts/test.sh and scripts/memorize_book.sh (sourced, from the repo root): a virtual environment in .venv
# with torch (the CPU build first where the machine offers it; any torch >= 2.4 works) and this package, editable,
# with the extras named in $1 (e.g. "[test]").
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
python -m pip install -q -e ".${1:-}"
