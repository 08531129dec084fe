"""The PEFT adapter lifecycle behaves as it does for LoRA."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import WIDTH, tiny_model, tokens

from peft_locas import LocasConfig, LocasLayer


def _locas_model(family="llama", **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("init_weights", False)
    return get_peft_model(tiny_model(family), LocasConfig(**kwargs))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LocasLayer)]


def _base_state(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "locas_" not in k}


def test_only_memory_parameters_are_trainable_and_a_step_changes_only_them():
    model = _locas_model(r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".default.gate", ".default.key", ".default.value")) for n in trainable)
    assert len(trainable) == 2 * 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_disable_adapter_gives_exact_base_outputs():
    x = tokens()
    base = tiny_model()(x).logits
    model = _locas_model()
    assert not torch.allclose(model(x).logits, base)
    with model.disable_adapter():
        assert torch.equal(model(x).logits, base)
    assert not torch.allclose(model(x).logits, base)


def test_multiple_adapters_switching_and_combining():
    x = tokens()
    model = _locas_model(r=4)
    model.add_adapter("second", LocasConfig(r=3, init_weights=False))
    out_default = model(x).logits
    model.set_adapter("second")
    out_second = model(x).logits
    assert not torch.allclose(out_default, out_second)
    assert all(layer.active_adapters == ["second"] for layer in _layers(model))
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"second"}

    # both active: the memories add up
    model.base_model.set_adapter(["default", "second"])
    layer = _layers(model)[0]
    h = torch.randn(2, 5, 64)
    expected = layer.get_base_layer()(h) + layer.memory_output(h, "default") + layer.memory_output(h, "second")
    torch.testing.assert_close(layer(h), expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(x).logits, tiny_model()(x).logits)


def test_delete_adapter_leaves_no_state():
    model = _locas_model()
    model.add_adapter("other", LocasConfig(r=3, init_weights=False))
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for layer in _layers(model):
        assert "other" not in layer.locas_memory
    assert not any("other" in k for k in model.state_dict())
    assert not any("other" in n for n, _ in model.named_buffers())


def test_merge_unmerge_round_trip_is_exact():
    x = tokens()
    model = _locas_model()
    base_before = _base_state(model)
    unmerged = model(x).logits
    model.merge_adapter()
    layer = _layers(model)[0]
    assert layer.merged and layer.get_base_layer().up_proj.weight.shape[0] == WIDTH + 4
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert not layer.merged
    after = _base_state(model)
    assert after.keys() == base_before.keys() and all(torch.equal(after[k], base_before[k]) for k in after)
    torch.testing.assert_close(model(x).logits, unmerged)


def test_merging_twice_warns_and_does_nothing():
    model = _locas_model()
    model.merge_adapter()
    width = _layers(model)[0].get_base_layer().up_proj.weight.shape[0]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert _layers(model)[0].get_base_layer().up_proj.weight.shape[0] == width
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        _layers(model)[0].unmerge()


def test_safe_merge_refuses_nan():
    model = _locas_model()
    with torch.no_grad():
        _layers(model)[0].locas_memory["default"].value[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    assert _layers(model)[0].get_base_layer().up_proj.weight.shape[0] == WIDTH


def test_unload_returns_exactly_the_base_model():
    x = tokens()
    reference = tiny_model()
    model = _locas_model()
    base = model.unload()
    assert type(base.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert not any("locas" in n for n, _ in base.named_modules())
    assert all(
        torch.equal(a, b) for a, b in zip(base.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert torch.equal(base(x).logits, reference(x).logits)


def test_merge_and_unload_several_adapters_appends_all_units():
    x = tokens()
    model = _locas_model(r=4)
    model.add_adapter("second", LocasConfig(r=3, init_weights=False))
    model.base_model.set_adapter(["default", "second"])
    expected = model(x).logits
    merged = model.merge_and_unload()
    assert merged.config.intermediate_size == WIDTH + 7
    assert merged.model.layers[1].mlp.down_proj.weight.shape == (64, WIDTH + 7)
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_layers_to_transform_and_padding_on_merge():
    x = tokens()
    model = _locas_model(r=5, layers_to_transform=[1], layers_pattern="layers")
    assert [n for n in model.base_model.targeted_module_names] == ["model.layers.1.mlp"]
    expected = model(x).logits
    merged = model.merge_and_unload()
    untouched = merged.model.layers[0].mlp
    assert untouched.gate_proj.weight.shape[0] == WIDTH + 5 and merged.config.intermediate_size == WIDTH + 5
    assert torch.count_nonzero(untouched.down_proj.weight[:, WIDTH:]) == 0
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_exclude_modules():
    model = _locas_model(exclude_modules=["model.layers.0.mlp"])
    assert model.base_model.targeted_module_names == ["model.layers.1.mlp"]


def test_gradient_checkpointing_training_step():
    model = _locas_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases(dtype):
    x = tokens()
    base = tiny_model(dtype=dtype)
    base_logits = base(x).logits
    model = get_peft_model(tiny_model(dtype=dtype), LocasConfig(r=4))
    layer = _layers(model)[0]
    assert layer.locas_memory["default"].key.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    assert layer.get_base_layer().up_proj.weight.dtype == dtype
    logits = model(x).logits
    assert logits.dtype == dtype and torch.equal(logits, base_logits)
    kept = get_peft_model(tiny_model(dtype=dtype), LocasConfig(r=4), autocast_adapter_dtype=False)
    assert _layers(kept)[0].locas_memory["default"].key.dtype == dtype

    trained = get_peft_model(tiny_model(dtype=dtype), LocasConfig(r=4, init_weights=False))
    unmerged = trained(x).logits
    merged = trained.merge_and_unload()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == dtype
    torch.testing.assert_close(merged(x).logits, unmerged, atol=5e-2, rtol=5e-2)


def test_generate():
    model = _locas_model()
    prompt = tokens(batch=1, length=4)
    out = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], prompt)
    merged_out = copy.deepcopy(model).merge_and_unload().generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, merged_out)


def test_base_weights_untouched_until_merge():
    reference = tiny_model().state_dict()
    model = _locas_model()
    x = tokens()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    model.clip_memory_norms_()
    model.merge_adapter()
    model.unmerge_adapter()
    state = {k.replace(".base_layer", ""): v for k, v in _base_state(model).items()}
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_mixed_adapter_batches():
    """PEFT's `adapter_names` argument: each sample goes through the memory it names, "__base__" through none."""
    x = tokens(batch=3)
    model = _locas_model(r=4)
    model.add_adapter("second", LocasConfig(r=3, init_weights=False))
    outputs = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        outputs[name] = model(x).logits
    with model.disable_adapter():
        outputs["__base__"] = model(x).logits
    mixed = model(x, adapter_names=["second", "__base__", "default"]).logits
    for i, name in enumerate(["second", "__base__", "default"]):
        torch.testing.assert_close(mixed[i], outputs[name][i])
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope"):
        model(x, adapter_names=["nope", "default", "default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="when there are merged adapters"):
        model(x, adapter_names=["default"] * 3)
