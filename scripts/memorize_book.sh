#!/usr/bin/env bash
# The main job, from a bare machine: set up .venv (as scripts/test.sh does), prepare the offline assets, memorise the
# opening of a real Jane Austen novel into SmolLM2-135M with the default settings (prequential perplexity with and
# without the memory), then save the adapter and a merged vanilla checkpoint.
#
# Usage: bash scripts/memorize_book.sh [peft-locas memorize flags]
#   e.g. OUT=~/runs/emma bash scripts/memorize_book.sh --text emma --max-tokens all   (a whole book)
# Outputs in $OUT (default ~/peft-locas-runs/memorize-book): adapter/ (+ memorize_results.json, memorize_losses.png),
# merged/, checkpoints/. Rerunning the same command resumes from checkpoints/; other flags need another OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first where the machine offers it; any torch >= 2.4 works.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4"
python -m pip install -q -e .
peft-locas assets

out=${OUT:-$HOME/peft-locas-runs/memorize-book}
peft-locas memorize --text pride_and_prejudice --max-tokens 8192 --compare-baseline \
    --out "$out/adapter" --checkpoint-dir "$out/checkpoints" --overwrite "$@"
peft-locas merge --adapter "$out/adapter" --out "$out/merged" --overwrite
echo "done in ${SECONDS} s: $out"
