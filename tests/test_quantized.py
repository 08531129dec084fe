"""Locas memories on bitsandbytes 4-bit (NF4/FP4) and 8-bit bases, on the CPU."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from quantized_bases import QUANTIZATIONS, load
from tiny_models import WIDTH, tiny_model, tokens
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig, LocasLayer

pytest.importorskip("bitsandbytes")


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LocasLayer)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_memory_beside_a_quantized_base(saved_bases, family, quantization):
    x = tokens()
    model = load(saved_bases, family, quantization)
    logits(model, x)  # bitsandbytes may repack 4-bit weights for its CPU kernel on the first call
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8))
    layer = _layers(peft_model)[0]
    assert "4bit" in repr(layer) or "8bit" in repr(layer)  # the repr shows the quantized base
    assert layer.locas_memory["default"].key.dtype == torch.float32
    torch.testing.assert_close(logits(peft_model, x), base)  # value 0: exactly the quantized base
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, x), base)


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_saving_and_loading_memories_leaves_a_used_quantized_base_intact(saved_bases, tmp_path, quantization):
    """PEFT saves and loads adapters through ``state_dict()``, which on a 4-bit base that bitsandbytes repacked for its
    CPU kernel (first inference forward, AVX512-BF16 CPUs) used to corrupt the base in place (logits off by tens on
    SmolLM2). Wrapping protects every 4-bit layer, so the base stays exactly what it was through save, load and
    state_dict."""
    x = tokens()
    model = load(saved_bases, "llama", quantization)
    logits(model, x)  # the first inference forward: bitsandbytes may repack 4-bit weights here
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights=False))  # a random, non-zero memory
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.state_dict()
    # bf16 compute: bitsandbytes repacks a double-quantized state a little differently after saving (2e-3 here);
    # the corruption this guards against is ten times that on this tiny model and ~50 on SmolLM2
    tolerance = dict(atol=5e-3, rtol=0) if "bf16" in quantization else {}
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, x), base, **tolerance)
    with_memory = logits(peft_model, x)
    reloaded = PeftModel.from_pretrained(peft_model.unload(), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, x), with_memory, **tolerance)
    assert (with_memory - base).abs().max() > 0.05  # the memory is there, and the comparison above could fail


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("prepare", [False, True])
def test_training_changes_only_memory_and_lowers_the_loss(saved_bases, quantization, prepare):
    model = load(saved_bases, "llama", quantization)
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights="gaussian"))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    x = tokens(batch=2, length=16)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        peft_model.clip_memory_norms_()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable and all(".locas_memory." in n for n in changed)


def test_adapter_moves_between_quantized_and_float_bases(saved_bases, tmp_path):
    x = tokens()
    quantized = get_peft_model(load(saved_bases, "llama", "nf4"), LocasConfig(r=8, init_weights=False))
    quantized.save_pretrained(tmp_path / "from4bit")
    on_float = PeftModel.from_pretrained(load(saved_bases, "llama", None), tmp_path / "from4bit")
    reference = get_peft_model(load(saved_bases, "llama", None), LocasConfig(r=8, init_weights=False))
    # same memory on both bases: the difference is the base's quantization error, not the adapter's
    float_gap = (logits(on_float, x) - logits(quantized, x)).abs().max()
    with quantized.disable_adapter(), on_float.disable_adapter():
        base_gap = (logits(on_float, x) - logits(quantized, x)).abs().max()
    assert float_gap <= 2 * base_gap + 1e-3

    reference.save_pretrained(tmp_path / "fromfloat")
    on_4bit = PeftModel.from_pretrained(load(saved_bases, "llama", "nf4"), tmp_path / "fromfloat")
    for a, b in zip(_layers(on_4bit), _layers(reference), strict=True):
        torch.testing.assert_close(a.locas_memory["default"].value, b.locas_memory["default"].value)
        assert a.locas_memory["default"].tau == b.locas_memory["default"].tau  # tau travels with the adapter


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "nf4-double-bf16", "int8"])
def test_unmerge_and_unload_give_the_quantized_base_back(saved_bases, quantization):
    x = tokens()
    model = load(saved_bases, "llama", quantization)
    logits(model, x)
    base = logits(model, x)
    projections = [(m, m.weight) for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights=False))
    unmerged = logits(peft_model, x)
    with pytest.warns(UserWarning, match="re-quantizes.*merge_and_unload\\(dequantize=True\\)"):
        peft_model.merge_adapter()
    layer = _layers(peft_model)[0]
    assert layer.get_base_layer().up_proj.out_features % 64 == 0 if "4" in quantization else True
    peft_model.unmerge_adapter()
    assert all(m.weight is w for m, w in projections)  # the very same quantized weights
    torch.testing.assert_close(logits(peft_model, x), unmerged)
    restored = peft_model.unload()
    assert all(m.weight is w for m, w in projections)
    torch.testing.assert_close(logits(restored, x), base)


def _memory_effect_kept(merged, unmerged, base):
    """1 - ||merged - unmerged|| / ||unmerged - base||: the share of the memory's effect on the logits that survives."""
    return 1 - ((merged - unmerged).norm() / (unmerged - base).norm()).item()


@pytest.mark.parametrize(
    "quantization, min_kept",
    [("nf4", 0.8), ("fp4", 0.72), ("nf4-double-bf16", 0.8), ("int8", 0.94)],
)
def test_quantized_merge_error_is_bounded_and_reloads(saved_bases, tmp_path, quantization, min_kept):
    x = tokens()
    model = load(saved_bases, "llama", quantization)
    logits(model, x)
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights=False))
    unmerged = logits(peft_model, x)
    merged = peft_model.merge_and_unload()
    assert merged.config.intermediate_size == (WIDTH + 64 if "4" in quantization else WIDTH + 8)
    assert "quantization_config" in merged.config.to_dict()
    merged_logits = logits(merged, x)
    assert _memory_effect_kept(merged_logits, unmerged, base) >= min_kept
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    logits(reloaded, x)
    torch.testing.assert_close(logits(reloaded, x), logits(merged, x), atol=1e-2, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_dequantized_export_is_a_float_checkpoint(saved_bases, tmp_path, family, quantization):
    x = tokens()
    model = load(saved_bases, family, quantization)
    logits(model, x)
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights=False))
    unmerged = logits(peft_model, x)
    merged = peft_model.merge_and_unload(dequantize=True)
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    merged.save_pretrained(tmp_path / "float")
    config = json.loads((tmp_path / "float/config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval()
    reloaded_logits = logits(reloaded, x)
    # the quantized model computes in its own kernels; the float export matches it up to that rounding, which is
    # measured here as the gap between the quantized base and its dequantized copy
    dequantized_base = get_peft_model(load(saved_bases, family, quantization), LocasConfig(r=8)).merge_and_unload(
        dequantize=True
    )
    kernel_gap = (logits(dequantized_base, x) - base).abs().max().item()
    assert (reloaded_logits - unmerged).abs().max().item() <= 2 * kernel_gap + 1e-4
    assert _memory_effect_kept(reloaded_logits, unmerged, base) >= 0.9


def test_unsupported_quantized_layer_trains_but_refuses_to_merge():
    """A layer type that can be read (dequantized) but not re-quantized, standing in for GPTQ/AWQ-like schemes."""
    from peft_locas.weights.projections import ProjectionWeights, is_quantized, read_projection

    class FrozenQuantLinear(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.bias = weight, None

        def forward(self, x):
            return x @ self.weight.T

    read_projection.register(FrozenQuantLinear, lambda layer: ProjectionWeights(layer.weight, layer.bias))
    is_quantized.register(FrozenQuantLinear, lambda layer: True)
    model = tiny_model()
    for layer in model.model.layers:
        layer.mlp.down_proj = FrozenQuantLinear(layer.mlp.down_proj.weight)
    peft_model = get_peft_model(model, LocasConfig(r=4))
    peft_model(tokens())
    with pytest.raises(TypeError, match="cannot re-quantize them.*merge_and_unload\\(dequantize=True\\)"):
        peft_model.merge_adapter()
    assert _layers(peft_model)[0].get_base_layer().up_proj.out_features == WIDTH  # nothing changed
