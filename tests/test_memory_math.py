"""The memory computes tau * Mem(x) exactly as the method's equations say, with the data-free initialisations."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import GLU_FAMILIES, MLP_FAMILIES, WIDTH, tiny_model

from peft_locas import LocasConfig, LocasLayer
from peft_locas.weights.blocks import find_block_kind


def _first_layer(peft_model) -> LocasLayer:
    return next(m for m in peft_model.modules() if isinstance(m, LocasLayer))


def _block_weights(block):
    """(gate rows, up/fc_in rows, down columns as rows) read by hand for the two layouts the tests use."""
    if hasattr(block, "gate_proj"):
        return block.gate_proj.weight, block.up_proj.weight, block.down_proj.weight.T
    return None, block.c_fc.weight.T, block.c_proj.weight  # GPT-2 Conv1D stores (in, out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_output_matches_the_equations(family):
    model = get_peft_model(tiny_model(family), LocasConfig(r=5, init_weights=False))
    layer = _first_layer(model)
    block = layer.get_base_layer()
    x = torch.randn(3, 7, 64)
    key, value, tau = (
        layer.locas_memory["default"].key,
        layer.locas_memory["default"].value,
        layer.locas_memory["default"].tau,
    )
    act = block.act_fn if family == "llama" else block.act
    if family == "llama":
        hidden = act(x @ layer.locas_memory["default"].gate.T) * (x @ key.T)
    else:
        hidden = act(x @ key.T)
    expected = block(x) + tau * hidden @ value
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_gradients_match_the_equations(family):
    """The fused forward (gate and key rows in one matmul, the output added by one addmm) has the gradients of the
    equations' separate products, for the memory's rows and for the input."""
    model = get_peft_model(tiny_model(family), LocasConfig(r=5, init_weights=False))
    layer = _first_layer(model)
    block, memory = layer.get_base_layer(), layer.locas_memory["default"]
    act = block.act_fn if family == "llama" else block.act
    x = torch.randn(2, 7, 64, requires_grad=True)
    upstream = torch.randn(2, 7, 64)
    (layer(x) * upstream).sum().backward()
    fused = [t.grad.clone() for t in (x, *memory.parameters())]
    for t in (x, *memory.parameters()):
        t.grad = None
    hidden = act(x @ memory.gate.T) * (x @ memory.key.T) if family == "llama" else act(x @ memory.key.T)
    ((block(x) + memory.tau * hidden @ memory.value) * upstream).sum().backward()
    for got, want in zip(fused, (t.grad for t in (x, *memory.parameters())), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_memory_in_float32_beside_a_bfloat16_block():
    """A memory kept in float32 (PEFT's autocast_adapter_dtype) adds its output to a bfloat16 block in bfloat16."""
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), LocasConfig(r=5, init_weights=False))
    layer = _first_layer(model)
    memory = layer.locas_memory["default"]
    assert memory.key.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer.get_base_layer()(x) + memory(x.float(), layer.get_base_layer().act_fn).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_init_clones_top_param_norm_units(family):
    r = 6
    model = get_peft_model(tiny_model(family), LocasConfig(r=r))
    layer = _first_layer(model)
    gate, up, down = _block_weights(layer.get_base_layer())
    scores = up.norm(dim=1) * down.norm(dim=1) * (gate.norm(dim=1) if gate is not None else 1)
    chosen = torch.sort(scores, descending=True, stable=True).indices[:r]
    torch.testing.assert_close(layer.locas_memory["default"].key, F.normalize(up[chosen], dim=1))
    if gate is not None:
        torch.testing.assert_close(layer.locas_memory["default"].gate, F.normalize(gate[chosen], dim=1))
    else:
        assert layer.locas_memory["default"].gate is None
    assert torch.count_nonzero(layer.locas_memory["default"].value) == 0
    assert layer.locas_memory["default"].tau.item() == pytest.approx(down.norm(dim=1).mean().item() / r, rel=1e-6)


def test_fixed_tau_and_gaussian_init():
    model = get_peft_model(tiny_model("llama"), LocasConfig(r=9, tau=0.25, init_weights="gaussian"))
    layer = _first_layer(model)
    assert layer.locas_memory["default"].tau.item() == 0.25
    for rows in (layer.locas_memory["default"].gate, layer.locas_memory["default"].key):
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(9))
    assert torch.count_nonzero(layer.locas_memory["default"].value) == 0


def test_non_identity_init_has_unit_rows_everywhere():
    layer = _first_layer(get_peft_model(tiny_model("llama"), LocasConfig(r=4, init_weights=False)))
    for rows in (
        layer.locas_memory["default"].gate,
        layer.locas_memory["default"].key,
        layer.locas_memory["default"].value,
    ):
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("family", GLU_FAMILIES + MLP_FAMILIES)
def test_wrapped_untrained_model_is_exactly_the_base(family):
    from tiny_models import tokens

    x = tokens()
    base = tiny_model(family)(x).logits
    model = get_peft_model(tiny_model(family), LocasConfig(r=8))
    assert torch.equal(model(x).logits, base)
    expected_variant = "glu" if family in GLU_FAMILIES else "mlp"
    layers = [m for m in model.modules() if isinstance(m, LocasLayer)]
    assert len(layers) == 2 and {layer.variant for layer in layers} == {expected_variant}
    assert model.peft_config["default"].target_modules == {"mlp"}


def test_clip_memory_norms_projects_onto_the_ball():
    model = get_peft_model(tiny_model("llama"), LocasConfig(r=4, max_norm=0.5, init_weights=False))
    layer = _first_layer(model)
    torch.testing.assert_close(layer.locas_memory["default"].key.norm(dim=1), torch.full((4,), 0.5))  # clipped at init
    with torch.no_grad():
        layer.locas_memory["default"].key.copy_(torch.diag(torch.tensor([3.0, 0.2, 0.5, 1.0])) @ torch.eye(4, 64))
        before = layer.locas_memory["default"].key.clone()
    model.clip_memory_norms_()
    after = layer.locas_memory["default"].key
    torch.testing.assert_close(after.norm(dim=1), torch.tensor([0.5, 0.2, 0.5, 0.5]))
    torch.testing.assert_close(after[1], before[1])  # rows inside the ball are untouched
    torch.testing.assert_close(F.normalize(after, dim=1), F.normalize(before, dim=1))  # directions kept


def test_clip_disabled_with_max_norm_none():
    model = get_peft_model(tiny_model("llama"), LocasConfig(r=4, max_norm=None, init_weights=False))
    layer = _first_layer(model)
    with torch.no_grad():
        layer.locas_memory["default"].value.mul_(10)
    before = layer.locas_memory["default"].value.clone()
    model.clip_memory_norms_()
    assert torch.equal(layer.locas_memory["default"].value, before)


def test_block_kind_detection():
    model = tiny_model("phi3")
    kind = find_block_kind(model.model.layers[0].mlp)
    assert kind.variant == "glu" and kind.width(model.model.layers[0].mlp) == WIDTH
    assert find_block_kind(model.model.layers[0].self_attn) is None
    assert find_block_kind(model.model.layers[0].mlp.gate_up_proj) is None
