"""NL-SVD compression of Locas-MLP memories: exact at the probe keys, bounded elsewhere, and reloadable."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import HIDDEN, tiny_model, tokens

from peft_locas import LocasConfig, LocasLayer, compress_locas_memory, init_locas_weights
from peft_locas.init.nlsvd import nlsvd
from peft_locas.weights.blocks import Units


def _layers(model) -> list[LocasLayer]:
    return [m for m in model.modules() if isinstance(m, LocasLayer)]


def _gradient_model(r_tokens=12, **config):
    """A GPT-2 Locas-MLP memory grown from gradient slots (width = number of target tokens)."""
    model = get_peft_model(tiny_model("gpt2"), LocasConfig(r=4, **config))
    batch = {"input_ids": tokens(2, r_tokens // 2 + 1, seed=5)}
    init_locas_weights(model, [batch], method="gradient", show_progress_bar=False)
    return model


def _max_slope(activation) -> float:
    """The activation's Lipschitz constant, measured on a fine grid (its derivative is bounded and smooth)."""
    x = torch.linspace(-10, 10, 200001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(activation(x).sum(), x)
    return slope.abs().max().item() * 1.001


def test_output_is_reproduced_exactly_at_the_probe_keys():
    model = _gradient_model()
    old = [copy.deepcopy(layer) for layer in _layers(model)]
    compress_locas_memory(model, 5)
    for layer, before in zip(_layers(model), old, strict=True):
        memory = layer.locas_memory["default"]
        assert memory.width == 5 and memory.gate is None
        torch.testing.assert_close(memory.key @ memory.key.T, torch.eye(5), atol=1e-6, rtol=0)
        probes = memory.key.detach()
        expected = before.memory_output(probes, "default")
        torch.testing.assert_close(layer.memory_output(probes, "default"), expected, atol=1e-6, rtol=1e-5)
        assert expected.norm(dim=1).min() > 1e-4, "the probes see a non-trivial output"


def test_error_elsewhere_is_within_the_lipschitz_bound():
    """||new(x) - old(x)|| <= tau * L * (sum_i ||k_i|| ||v_i|| + sum_j ||k'_j|| ||v'_j||) * min_j ||x - k'_j||: both
    memories are Lipschitz and agree at every probe k'_j."""
    model = _gradient_model()
    old = [copy.deepcopy(layer) for layer in _layers(model)]
    compress_locas_memory(model, 5)
    generator = torch.Generator().manual_seed(0)
    for layer, before in zip(_layers(model), old, strict=True):
        new_memory, old_memory = layer.locas_memory["default"], before.locas_memory["default"]
        slope = _max_slope(layer.block_kind.activation(layer.get_base_layer()))
        probes = new_memory.key.detach()
        near = probes[torch.arange(200) % 5] + 0.1 * torch.randn(200, HIDDEN, generator=generator)
        far = torch.randn(200, HIDDEN, generator=generator)
        x = torch.cat([near, far])
        error = (layer.memory_output(x, "default") - before.memory_output(x, "default")).norm(dim=1)

        bound = (_lipschitz(old_memory, slope) + _lipschitz(new_memory, slope)) * torch.cdist(x, probes).min(
            dim=1
        ).values
        assert torch.all(error <= bound + 1e-6)
        assert torch.all(error[:200] < error[200:].median()), "closer to a probe, smaller error"


def _lipschitz(memory, slope: float) -> float:
    """A Lipschitz constant of x -> tau * V^T act(K x), given one of act."""
    return memory.tau.item() * slope * (memory.key.norm(dim=1) * memory.value.norm(dim=1)).sum().item()


def test_orthonormal_memory_is_kept_exactly_everywhere():
    """When the memory already is r_new orthonormal keys (plus zero-strength slots), NL-SVD changes no output."""
    model = get_peft_model(tiny_model("gpt2"), LocasConfig(r=5, init_weights="data", max_norm=None))
    layer = _layers(model)[0]
    keys = torch.linalg.qr(torch.randn(HIDDEN, 4, generator=torch.Generator().manual_seed(1))).Q.T
    values = torch.randn(4, HIDDEN) * torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]  # distinct strengths
    layer.set_memory(
        "default",
        Units(None, torch.cat([keys, torch.randn(1, HIDDEN)]), torch.cat([values, torch.zeros(1, HIDDEN)])),
        0.7,
    )
    other = _layers(model)[1]
    other.set_memory(
        "default", Units(None, torch.cat([keys, keys[:1]]), torch.cat([values, torch.zeros(1, HIDDEN)])), 0.7
    )
    x = torch.randn(50, HIDDEN)
    expected = [lay.memory_output(x, "default") for lay in _layers(model)]
    compress_locas_memory(model, 4)
    for lay, before in zip(_layers(model), expected, strict=True):
        torch.testing.assert_close(lay.memory_output(x, "default"), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lay.locas_memory["default"].key, keys, atol=1e-6, rtol=0)


def test_probes_are_the_leading_eigenvectors_of_the_strength_weighted_key_scatter():
    generator = torch.Generator().manual_seed(2)
    key, value = torch.randn(30, 16, generator=generator), torch.randn(30, 8, generator=generator)
    compressed = nlsvd(Units(None, key, value), 6, F.gelu)
    strength = key.norm(dim=1) * value.norm(dim=1)
    unit = F.normalize(key.double(), dim=1)
    eigenvalues, eigenvectors = torch.linalg.eigh(unit.T @ (unit * strength.double()[:, None]))
    expected = eigenvectors[:, -6:].flip(-1).T
    expected = expected * torch.sign(expected @ (unit * strength.double()[:, None]).sum(0))[:, None]
    torch.testing.assert_close(compressed.key, expected, atol=1e-6, rtol=0)
    # new values solve act(P P^T) V' = act(P K^T) V, i.e. (act(0) = 0) the old output at each probe / act(1)
    old_output = F.gelu(compressed.key @ key.double().T) @ value.double()
    torch.testing.assert_close(compressed.value * F.gelu(torch.tensor(1.0, dtype=torch.float64)), old_output)


@pytest.mark.parametrize("max_norm", [1.0, None])
def test_tau_absorbs_long_values_instead_of_clipping(max_norm):
    model = _gradient_model(r_tokens=20, max_norm=max_norm)
    taus = [layer.locas_memory["default"].tau.item() for layer in _layers(model)]
    old = [copy.deepcopy(layer) for layer in _layers(model)]
    compress_locas_memory(model, 3)
    for layer, before, tau in zip(_layers(model), old, taus, strict=True):
        memory = layer.locas_memory["default"]
        longest = memory.value.norm(dim=1).max().item()
        if max_norm is None:
            assert memory.tau.item() == pytest.approx(tau)
        else:
            assert longest <= max_norm + 1e-6 and memory.tau.item() >= tau
            assert longest == pytest.approx(max_norm) or memory.tau.item() == pytest.approx(tau)
        probes = memory.key.detach()
        torch.testing.assert_close(
            layer.memory_output(probes, "default"), before.memory_output(probes, "default"), atol=1e-6, rtol=1e-5
        )


def test_compressed_adapter_saves_and_reloads(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    model = get_peft_model(type(tiny_model("gpt2")).from_pretrained(tmp_path / "base").eval(), LocasConfig(r=4))
    init_locas_weights(model, [{"input_ids": tokens(2, 7, seed=5)}], method="gradient", show_progress_bar=False)
    compress_locas_memory(model, 5)
    config = model.peft_config["default"]
    assert (config.r, config.init_weights) == (5, "data")
    assert all(layer.locas_memory["default"].key.requires_grad for layer in _layers(model))
    model.save_pretrained(tmp_path / "adapter")
    x = tokens()
    loaded = PeftModel.from_pretrained(
        type(tiny_model("gpt2")).from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "family, r_new, message",
    [
        (
            "llama",
            2,
            r"NL-SVD compresses two-layer-MLP \(Locas-MLP\) memories, but 'model.layers.0.mlp' holds a GLU memory",
        ),
        (
            "gpt2",
            12,
            r"r_new must be an integer from 1 to 11 \(below the current width 12 of 'transformer.h.0.mlp'\), got 12",
        ),
        ("gpt2", 0, r"r_new must be an integer from 1 to 11"),
    ],
)
def test_errors(family, r_new, message):
    model = _gradient_model() if family == "gpt2" else get_peft_model(tiny_model(family), LocasConfig(r=4))
    with pytest.raises(ValueError, match=message):
        compress_locas_memory(model, r_new)


def test_r_new_above_the_hidden_size_is_rejected():
    model = get_peft_model(tiny_model("gpt2"), LocasConfig(r=HIDDEN + 2, init_weights="data"))
    with pytest.raises(ValueError, match=r"r_new=65 exceeds the hidden size 64, the most orthogonal probe keys"):
        compress_locas_memory(model, HIDDEN + 1)
