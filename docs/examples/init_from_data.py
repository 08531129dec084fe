"""Data-driven initialisation of a Locas-GLU memory: the methods, the token masks, and a cached init state."""

# --8<-- [start:methods]
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, LocasInitState, get_locas_init_state, init_locas_weights

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=16))

# a padded batch: statistics count only tokens with attention_mask 1 (and, if labels are given, labels != -100)
lines = sample_text().splitlines()
batches = [tokenizer(lines[i : i + 4], return_tensors="pt", padding=True) for i in range(0, len(lines), 4)]

init_locas_weights(model, batches)  # method="top_k": the paper's default, clone the most active units
for method in ("bottom_k", "random_clone", "gaussian", "activation_keys", "param_norm"):  # the ablations
    init_locas_weights(model, batches, method=method, show_progress_bar=False)
# --8<-- [end:methods]
assert model.peft_config["default"].init_weights == "data"

# --8<-- [start:state]
state = get_locas_init_state(model, batches, method="top_k")  # the model is not changed
print(state.indices["model.layers.0.mlp"][:8])  # the base units cloned into layer 0's memory, most active first
state.save("context.locas-init.safetensors")

# later, or on another copy of the model (another dtype, a quantized base) with the same LocasConfig
state = LocasInitState.load("context.locas-init.safetensors")
init_locas_weights(model, init_state=state)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)  # after the init
# --8<-- [end:state]

layer = model.base_model.model.model.layers[0].mlp
memory = layer.locas_memory["default"]
base_up = layer.get_base_layer().up_proj.weight
cloned = base_up[state.indices["model.layers.0.mlp"]]
torch.testing.assert_close(memory.key, cloned / cloned.norm(dim=1, keepdim=True))  # unit-norm clones
assert torch.count_nonzero(memory.value) == 0
