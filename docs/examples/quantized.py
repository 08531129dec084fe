"""A Locas memory beside a bitsandbytes 4-bit base (runs on CPU and CUDA), initialised from a full-precision copy,
and the two merge paths: a full-precision export, or a re-quantized checkpoint."""

# --8<-- [start:load]
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_locas import LocasConfig, get_locas_init_state, init_locas_weights

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"
device = "cuda" if torch.cuda.is_available() else "cpu"

nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4, device_map=device)
model = prepare_model_for_kbit_training(model)  # optional, as for QLoRA
model = get_peft_model(model, LocasConfig(r=16))  # the memory is float32 beside the 4-bit MLP blocks
# --8<-- [end:load]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
ids = tokenizer(sample_text(), return_tensors="pt").input_ids
context = [{"input_ids": chunk} for chunk in ids.split(256, dim=1)]

# --8<-- [start:init]
# statistics from the full-precision model, applied to the quantized one (same LocasConfig, same module names)
full = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=16))
state = get_locas_init_state(full, context)
state.save("init_state.safetensors")  # optional: cache it
init_locas_weights(model, init_state=state)
# --8<-- [end:init]

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
model.train()
for batch in context:
    model(input_ids=batch["input_ids"].to(device), labels=batch["input_ids"].to(device)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.clip_memory_norms_()
model.eval()
model.save_pretrained("my-memory")
x = ids[:, :64].to(device)
with torch.no_grad():
    unmerged = model(x).logits.float()

# --8<-- [start:merge]
# path 1: a float checkpoint; the memory is appended exactly to the dequantized weights
exported = model.merge_and_unload(dequantize=True)
exported.save_pretrained("merged-float")  # no quantization_config: loads as a plain float model

# path 2: a 4-bit checkpoint with wider MLPs; the appended units are rounded (warns)
model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4, device_map=device)
model = PeftModel.from_pretrained(model, "my-memory")
requantized = model.merge_and_unload()  # UserWarning: "Merging a Locas memory into a quantized MLP block ..."
requantized.save_pretrained("merged-4bit")  # keeps its quantization_config; reloads as a 4-bit model
# --8<-- [end:merge]

with torch.no_grad():
    float_logits = exported(x).logits.float()
    quantized_logits = requantized(x).logits.float()
print(f"float export: max |logit diff| {(float_logits - unmerged).abs().max().item():.1e}")
print(f"4-bit re-quantized merge: max |logit diff| {(quantized_logits - unmerged).abs().max().item():.1e}")
assert "quantization_config" not in exported.config.to_dict()
assert "quantization_config" in requantized.config.to_dict()
