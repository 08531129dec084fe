"""Composing memories (``add_weighted_adapter(..., combination_type="cat")``): the composed memory's output is exactly
the weighted sum of its inputs' in every block and family, before and after merging, and a merged composed model
reloads in plain transformers."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig
from peft_locas.tuner.layer import LocasLayer


def two_memories(family: str):
    model = get_peft_model(tiny_model(family), LocasConfig(r=4, init_weights=False), adapter_name="one")
    model.add_adapter("two", LocasConfig(r=6, init_weights=False))
    with torch.no_grad():  # memories with a visible effect: "False" leaves value rows at zero
        for name, parameter in model.named_parameters():
            if "locas_memory" in name:
                parameter.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "gpt_neox"])
def test_cat_is_the_weighted_sum_in_every_block(family):
    model = two_memories(family)
    model.add_weighted_adapter(["one", "two"], [0.5, -2.0], "ab")
    assert model.peft_config["ab"].r == 10
    x = torch.randn(2, 5, model.config.hidden_size)
    layers = [m for m in model.modules() if isinstance(m, LocasLayer)]
    assert layers
    for layer in layers:
        expected = 0.5 * layer.memory_output(x, "one") - 2.0 * layer.memory_output(x, "two")
        torch.testing.assert_close(layer.memory_output(x, "ab"), expected, atol=1e-5, rtol=1e-5)
        assert layer.locas_memory["ab"].width == 10 and not layer.locas_memory["ab"].key.requires_grad


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_composed_memory_equals_both_active_and_merges_exactly(family, tmp_path):
    model = two_memories(family)
    ids = tokens()
    model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "ab")
    with torch.no_grad():
        model.base_model.set_adapter(["one", "two"])
        both = model(ids).logits
        model.set_adapter("ab")
        composed = model(ids).logits
        torch.testing.assert_close(composed, both, atol=1e-5, rtol=1e-5)
        model.delete_adapter("one")
        model.delete_adapter("two")
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, composed, atol=1e-5, rtol=1e-5)
        merged.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(reloaded(ids).logits, composed, atol=1e-5, rtol=1e-5)


def test_a_composed_adapter_saves_and_reloads(tmp_path):
    from peft import PeftModel

    model = two_memories("llama")
    model.add_weighted_adapter(["one", "two"], [1.0, 0.25], "ab")
    model.set_adapter("ab")
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ab").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_misuse_is_refused_with_peft_wording():
    model = two_memories("llama")
    cases = [
        ((["one", "nope"], [1, 1], "x"), "Adapter nope does not exist"),
        ((["one", "two"], [1, 1], "x", "svd"), "Invalid combination_type: svd"),
        ((["one", "two"], [1], "x"), r"give one weight per adapter \(2 adapters, 1 weights\)"),
        ((["one", "two"], [1, 1], "one"), "an adapter named 'one' already exists"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model.add_weighted_adapter(*args)
    assert set(model.peft_config) == {"one", "two"}  # nothing half-added
