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

# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh
setup_env ""
peft-locas assets

out=${OUT:-$HOME/peft-locas-runs/memorize-book}
peft-locas memorize --text pride_and_prejudice --max-tokens 8192 --compare-baseline \
    --out "$out/adapter" --checkpoint-dir "$out/checkpoints" --overwrite "$@"
peft-locas merge --adapter "$out/adapter" --out "$out/merged" --overwrite
echo "done in ${SECONDS} s: $out"
