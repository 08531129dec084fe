"""Locas-MLP (GPT-2-style blocks): one gradient slot per memorised token, grown chunk by chunk, then compressed with
NL-SVD."""

# --8<-- [start:gradient]
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, compress_locas_memory, init_locas_weights

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir("gpt2")  # stands in for a GPT-2-style checkpoint (two-layer MLP blocks)

tokenizer = AutoTokenizer.from_pretrained(model_dir)
ids = tokenizer(sample_text(), return_tensors="pt").input_ids
chunks = [{"input_ids": chunk} for chunk in ids[:, :240].split(80, dim=1)]

# init_weights="data": the memory's width will come from the data (one slot per token), not from r
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=1, init_weights="data"))
init_locas_weights(model, chunks[:1], method="gradient", eps=1.0)  # 79 slots: one per predicted token
for chunk in chunks[1:]:
    init_locas_weights(model, [chunk], method="gradient", append=True)  # +79 slots per chunk
print(model.peft_config["default"].r)  # 237

compress_locas_memory(model, r_new=32)  # NL-SVD: 32 probe keys, exact at each probe
print(model.peft_config["default"].r)  # 32; the saved adapter reloads at this width
# --8<-- [end:gradient]
assert model.peft_config["default"].r == 32
model.save_pretrained("gradient-memory")
