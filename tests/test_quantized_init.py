"""init_locas_weights on bitsandbytes 4-bit/8-bit bases (CPU): statistics from the quantized compute path, and a
full-precision init applied to a quantized copy."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from quantized_bases import load
from tiny_models import tokens

from peft_locas import LocasConfig, LocasLayer, get_locas_init_state, init_locas_weights
from peft_locas.weights.projections import read_projection

pytest.importorskip("bitsandbytes")


def _batches():
    input_ids = tokens(2, 10, seed=6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return [{"input_ids": input_ids, "attention_mask": attention_mask}]


def _memories(model):
    return [m.locas_memory["default"] for m in model.modules() if isinstance(m, LocasLayer)]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_top_k_on_a_quantized_base_uses_its_own_activations(saved_bases, quantization):
    r = 6
    plain = load(saved_bases, "llama", quantization)
    x = tokens()
    with torch.no_grad():
        plain(x)  # bitsandbytes may repack 4-bit weights for its CPU kernel on the first call
    blocks = [layer.mlp for layer in plain.model.layers]
    seen = {i: [] for i in range(len(blocks))}
    handles = [
        b.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0])) for i, b in enumerate(blocks)
    ]
    batch = _batches()[0]
    with torch.no_grad():
        plain(**batch)
    for handle in handles:
        handle.remove()
    mask = batch["attention_mask"].bool()
    expected = {i: torch.topk(seen[i][0][mask].float().abs().mean(0), r).indices for i in seen}
    with torch.no_grad():
        base_logits = plain(x).logits

    model = get_peft_model(plain, LocasConfig(r=r, init_weights="data"))
    state = init_locas_weights(model, _batches(), show_progress_bar=False)
    for i, (index, memory) in enumerate(zip(state.indices.values(), _memories(model), strict=True)):
        assert index.tolist() == expected[i].tolist()
        up = read_projection(blocks[i].up_proj).weight.float()  # the dequantized rows
        torch.testing.assert_close(memory.key, F.normalize(up[index], dim=1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, base_logits)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_full_precision_init_applied_to_a_quantized_copy(saved_bases, quantization):
    x = tokens()
    full = get_peft_model(load(saved_bases, "llama", None), LocasConfig(r=6, init_weights="data"))
    state = get_locas_init_state(full, _batches(), show_progress_bar=False)
    quantized = get_peft_model(load(saved_bases, "llama", quantization), LocasConfig(r=6, init_weights="data"))
    with torch.no_grad():
        quantized(x)
        with quantized.disable_adapter():
            base_logits = quantized(x).logits
    init_locas_weights(quantized, init_state=state)
    for name, memory in zip(state.memories, _memories(quantized), strict=True):
        assert torch.equal(memory.key, state.memories[name].key) and torch.equal(memory.gate, state.memories[name].gate)
        assert memory.tau.item() == pytest.approx(state.taus[name], rel=1e-7)  # the full-precision tau travels
    with torch.no_grad():
        assert torch.equal(quantized(x).logits, base_logits)


def test_gradient_slots_on_a_4bit_base(saved_bases):
    model = get_peft_model(load(saved_bases, "gpt2", "nf4"), LocasConfig(r=4, init_weights="data"))
    init_locas_weights(model, _batches(), method="gradient", show_progress_bar=False)
    memories = _memories(model)
    assert model.peft_config["default"].r == 9 + 5
    joint = torch.stack([m.value for m in memories]).norm(dim=(0, 2))
    torch.testing.assert_close(joint, torch.ones(14))
    assert all(torch.isfinite(m.key).all() for m in memories)
