"""Merging a memory that covers only some layers: every MLP block is padded with zero units to one width."""

# --8<-- [start:padding]
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig

from _tiny import tiny_model_dir  # docs helper: a tiny offline model folder

model_dir = tiny_model_dir()  # a tiny Llama: 2 layers, d = 64, intermediate size 128

base = AutoModelForCausalLM.from_pretrained(model_dir)
base_params = sum(p.numel() for p in base.parameters())
# init_weights=False: random non-zero values, so the memory changes the outputs (a trained one would too)
model = get_peft_model(base, LocasConfig(r=8, layers_to_transform=[0], init_weights=False))
x = torch.tensor([[10, 20, 30, 40]])
with torch.no_grad():
    expected = model(x).logits

merged = model.merge_and_unload()
print(merged.config.intermediate_size)  # 136 = 128 + 8, for *both* layers
layer_1 = merged.model.layers[1].mlp
print(layer_1.up_proj.weight[128:].abs().max().item())  # 0.0: layer 1 was padded with 8 all-zero units
print(sum(p.numel() for p in merged.parameters()) - base_params)  # 3 * 2 layers * 64 * 8 = 3,072 (memory: 1,536)
with torch.no_grad():
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)  # same function
# --8<-- [end:padding]
assert merged.config.intermediate_size == 136
assert torch.count_nonzero(layer_1.gate_proj.weight[128:]) == 0
assert torch.count_nonzero(layer_1.down_proj.weight[:, 128:]) == 0
assert sum(p.numel() for p in merged.parameters()) - base_params == 3 * 2 * 64 * 8
