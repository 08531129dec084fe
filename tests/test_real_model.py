"""Checks on the real default model (SmolLM2-135M, Llama architecture) and a real book, when the offline assets are
prepared (`python -m peft_locas.assets`); skipped otherwise."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_locas import LocasConfig
from peft_locas.assets import book_path, default_model_dir
from peft_locas.weights.blocks import units_output

MODEL_DIR = default_model_dir()
BOOK = book_path("pride_and_prejudice")
pytestmark = pytest.mark.skipif(MODEL_DIR is None or BOOK is None, reason="offline assets not prepared")


@pytest.fixture(scope="module")
def paragraph():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = BOOK.read_text(encoding="utf-8")[:4000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :128]


def load(**kwargs):
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, **kwargs).eval()


def nll(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_wrapped_untrained_equals_base_and_merge_equals_unmerged(paragraph):
    model = load()
    with torch.no_grad():
        base = model(paragraph).logits
    assert torch.exp(torch.tensor(nll(model, paragraph))) < 60  # a trained model, not noise

    peft_model = get_peft_model(model, LocasConfig(r=64))
    assert len(peft_model.base_model.targeted_module_names) == 30
    with torch.no_grad():
        assert torch.equal(peft_model(paragraph).logits, base)

    # give the memory content with a few steps on the paragraph, then merge
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=4e-3)
    peft_model.train()
    for _ in range(1):
        peft_model(input_ids=paragraph, labels=paragraph).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        peft_model.clip_memory_norms_()
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(paragraph).logits
    assert (unmerged - base).abs().max() > 1e-2
    merged = peft_model.merge_and_unload()
    assert merged.config.intermediate_size == 1536 + 64
    with torch.no_grad():
        assert (merged(paragraph).logits - unmerged).abs().max().item() <= 1e-4


def _float_block_output(layer, x):
    """The block's output computed in fp32 from its (dequantized) weights: no kernel rounding involved."""
    block = layer.get_base_layer()
    return units_output(layer.block_kind.read_units(block), x.float(), layer.block_kind.activation(block))


def test_four_bit_real_model_merge_keeps_the_memory(paragraph):
    """Re-quantizing the appended units on merge keeps most of the memory's effect, measured per block in fp32 on the
    model's real hidden states (bitsandbytes' CPU kernel computes in bf16, whose rounding of SmolLM2's large MLP
    outputs would otherwise swamp the comparison)."""
    from peft_locas import LocasLayer

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    ).eval()
    peft_model = get_peft_model(model, LocasConfig(r=64, init_weights=False))
    layers = [m for m in peft_model.modules() if isinstance(m, LocasLayer)]
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].float())) for layer in layers
    ]
    with torch.no_grad():
        peft_model(paragraph[:, :64])
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        expected = {
            layer: _float_block_output(layer, inputs[layer]) + layer.memory_output(inputs[layer], "default")
            for layer in layers
        }
        effect = {layer: layer.memory_output(inputs[layer], "default") for layer in layers}
        peft_model.merge_adapter()
        error = sum((_float_block_output(layer, inputs[layer]) - expected[layer]).norm() ** 2 for layer in layers)
    kept = 1 - (error / sum(e.norm() ** 2 for e in effect.values())).sqrt().item()
    assert kept >= 0.8, f"only {kept:.1%} of the memory's effect survived the 4-bit merge"
