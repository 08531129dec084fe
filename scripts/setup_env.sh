# Shared by scripts/test.sh and scripts/memorize_book.sh (sourced, from the repo root). Sourcing defines `setup_env`;
# `setup_env EXTRAS` makes a virtual environment in .venv with torch (the CPU build first where the machine offers it;
# any torch >= 2.4 works) and this package, editable, with EXTRAS (e.g. "[test]", or "" for none), and activates it.
# A function rather than positional arguments to the sourced file: `. file` with no arguments would see the caller's
# own arguments as its $1 (`memorize_book.sh --text emma` once asked pip for the extras "--text").
setup_env() {
    local extras=$1
    local python=${PYTHON:-python3}
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    export DS_BUILD_OPS=0  # DeepSpeed (test extra) builds its C++ ops when first used, not at install
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
    python -m pip install -q -e ".${extras}"
}
