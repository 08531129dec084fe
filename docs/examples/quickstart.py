"""Quick start: wrap a causal LM with a Locas memory, initialise it from the context, train it with a plain loop,
save and reload the adapter, then merge it into a vanilla checkpoint."""

# --8<-- [start:load]
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, init_locas_weights  # importing peft_locas registers the LOCAS PEFT type

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForCausalLM.from_pretrained(model_dir)
# --8<-- [end:load]

# --8<-- [start:wrap]
model = get_peft_model(base, LocasConfig(r=16))  # a memory beside every MLP block, found by structure
model.print_trainable_parameters()
# --8<-- [end:wrap]

# --8<-- [start:init]
text = sample_text()  # the context the memory should hold
ids = tokenizer(text, return_tensors="pt").input_ids
chunks = [{"input_ids": chunk} for chunk in ids.split(256, dim=1)]  # any iterable of tokenizer-style batches

init_locas_weights(model, chunks)  # clone the units the context activates most; value 0, so still the base model
# --8<-- [end:init]
with torch.no_grad(), model.disable_adapter():
    base_logits = model(ids).logits
with torch.no_grad():
    assert torch.equal(model(ids).logits, base_logits)  # value 0: the initialised memory is a no-op

# --8<-- [start:train]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)  # after the init
model.train()
for step in range(3):
    for batch in chunks:
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clip_memory_norms_()  # the paper's safeguard: every memory row stays in the unit ball
    print(f"step {step}: loss {loss.item():.3f}")
model.eval()
# --8<-- [end:train]

# --8<-- [start:save]
model.save_pretrained("my-memory")  # adapter_config.json + adapter_model.safetensors (a few hundred KB here)

PUSH_TO_HUB = False  # True after `huggingface-cli login` to publish the adapter
if PUSH_TO_HUB:
    model.push_to_hub("your-name/my-memory")
# --8<-- [end:save]
with torch.no_grad():
    trained_logits = model(ids).logits

# --8<-- [start:reload]
# in a fresh process: `import peft_locas` (or anything from it) before loading a Locas adapter
base = AutoModelForCausalLM.from_pretrained(model_dir)
model = PeftModel.from_pretrained(base, "my-memory")  # or "your-name/my-memory" from the Hub
# --8<-- [end:reload]
with torch.no_grad():
    torch.testing.assert_close(model(ids).logits, trained_logits)

# --8<-- [start:merge]
merged = model.merge_and_unload()  # a plain LlamaForCausalLM whose MLPs are 16 units wider
print(merged.config.intermediate_size)  # 128 -> 144
merged.save_pretrained("merged")
tokenizer.save_pretrained("merged")

vanilla = AutoModelForCausalLM.from_pretrained("merged")  # no peft, no peft_locas needed to serve it
# --8<-- [end:merge]
assert vanilla.config.intermediate_size == 128 + 16
with torch.no_grad():
    torch.testing.assert_close(vanilla(ids).logits, trained_logits, atol=1e-4, rtol=1e-4)
