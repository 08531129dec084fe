"""Memorise a book with the score-then-train engine, compare with the TempLoRA baseline, save and plot the run."""

# --8<-- [start:memorize]
from dataclasses import replace
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, MemorizeConfig, evaluate, memorize, templora_config
from peft_locas.plotting import plot_losses

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"
Path("book.txt").write_text(sample_text(), encoding="utf-8")  # stands in for a whole book

tokenizer = AutoTokenizer.from_pretrained(model_dir)
text = Path("book.txt").read_text(encoding="utf-8")
config = MemorizeConfig(
    chunk_tokens=512,  # each chunk is scored, then trained on
    context_tokens=256,  # attention sees at most this much earlier text; the memory must carry the rest
    steps_per_chunk=2,
    compare_baseline=True,  # also score every chunk with the memory disabled
    checkpoint_dir="book-checkpoints",  # resumable: rerun after an interruption and it continues
)

model = AutoModelForCausalLM.from_pretrained(model_dir)
result = memorize(model, tokenizer, text, config, peft_config=LocasConfig(r=64))
print(f"prequential perplexity {result.perplexity:.2f} (without memory {result.baseline_perplexity:.2f})")
print(f"{result.total_tokens} tokens in {len(result.losses)} chunks, {result.tokens_per_s:.0f} tokens/s")
result.model.save_pretrained("book-memory")  # a Locas adapter, loadable with PeftModel.from_pretrained
plot_losses(result, "book-memory/losses.png")

# the TempLoRA baseline: the same protocol, with LoRA (r=64, alpha=64) on every linear layer
lora_config = replace(config, checkpoint_dir="lora-checkpoints")  # a checkpoint directory per run
base = AutoModelForCausalLM.from_pretrained(model_dir)
lora = memorize(base, tokenizer, text, lora_config, peft_config=templora_config(64))
print(f"TempLoRA: {lora.perplexity:.2f} (token-weighted mean of chunk perplexities: {lora.mean_chunk_perplexity:.2f})")

# scoring only (no training): the trained memory, read back, with the same windows
scored = evaluate(result.model, tokenizer, text, chunk_tokens=512, context_tokens=256, compare_baseline=True)
# --8<-- [end:memorize]
assert len(result.losses) == len(scored.losses) == -(-len(tokenizer(text).input_ids) // 512)
assert Path("book-memory/adapter_model.safetensors").is_file() and Path("book-memory/losses.png").is_file()
