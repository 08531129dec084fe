"""Parameter counts of Locas-GLU and LoRA on SmolLM2-135M's shape, built on the meta device (no weights, no
download), and what merging adds to the checkpoint."""

# --8<-- [start:counts]
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_locas import LocasConfig

# SmolLM2-135M: 30 layers, hidden size d = 576, MLP intermediate size m = 1536, 9 heads / 3 KV heads
config = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def trainable(peft_config):
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config)
    return get_peft_model(model, peft_config).get_nb_trainable_parameters()[0]


# on the meta device the memory cannot be cloned from weights: a data-free init and a fixed tau count the same
locas = trainable(LocasConfig(r=64, init_weights="gaussian", tau=0.01))
lora = trainable(LoraConfig(r=64, target_modules="all-linear"))
print(f"Locas-GLU r=64: {locas:,}")  # 3 * 30 * 576 * 64 = 3,317,760
print(f"LoRA r=64, all linear layers: {lora:,}")  # 30 * 64 * (q, k, v, o, gate, up, down in+out) = 19,537,920
print(f"ratio {lora / locas:.2f}")  # 5.89
# --8<-- [end:counts]
assert locas == 3 * 30 * 576 * 64 == 3_317_760
assert lora == 30 * 64 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3) == 19_537_920
