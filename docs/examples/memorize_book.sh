# once per machine: the offline default model (SmolLM2-135M-Instruct) and the books
peft-locas assets

# memorise Emma into a Locas memory: score each 512-token chunk, then train 2 steps on it
peft-locas memorize --text emma --out emma-locas --r 64 --chunk-tokens 512 --context-tokens 256 \
    --steps-per-chunk 2 --compare-baseline --checkpoint-dir emma-checkpoints

# the TempLoRA baseline on the same chunks and prefixes
peft-locas memorize --text emma --out emma-templora --adapter-type lora --r 64 --compare-baseline

# score the book again with the trained memory, against the bare model
peft-locas eval --adapter emma-locas --text emma

# bake the memory into a vanilla checkpoint (MLP intermediate size 1536 -> 1600)
peft-locas merge --adapter emma-locas --out emma-merged
