"""``merge_and_unload(pad_to_multiple_of=N)`` and ``peft-locas merge --pad-to-multiple-of N``: zero units round the
merged MLP width up to a quantizer's block (GGUF: 32, k-quants 256) and change no output, on GLU and two-layer MLP
blocks, float and dequantized 4-bit bases, through save/reload and the command line."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model
from quantized_bases import load
from tiny_checkpoint import make_checkpoint
from tiny_models import CONFIGS, WIDTH, tiny_model, tokens
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig, LocasLayer, cli
from peft_locas.engine.memorization import templora_config
from peft_locas.weights.blocks import find_block_kind

R = 16  # 128 + 16 = 144: like SmolLM2's 1536 + 16 = 1552, not a whole number of 32-wide GGUF blocks


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def mlp_blocks(model):
    return [(m, find_block_kind(m)) for m in model.modules() if find_block_kind(m) is not None]


def width_key(model) -> str:
    return "n_inner" if model.config.model_type == "gpt2" else "intermediate_size"


def with_memory(make_base, seed: int = 1):
    """A Locas memory (random, non-zero values) on ``make_base()``; the same memory for the same seed."""
    base = make_base()
    torch.manual_seed(seed)
    return get_peft_model(base, LocasConfig(r=R, init_weights=False))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_padding_is_exact_and_the_checkpoint_reloads(family, tmp_path):
    x = tokens()
    unmerged_model = with_memory(lambda: tiny_model(family))
    unmerged = logits(unmerged_model, x)
    plain = unmerged_model.merge_and_unload()
    assert getattr(plain.config, width_key(plain)) == WIDTH + R
    for multiple, width in ((1, WIDTH + R), (32, 160), (256, 256)):
        padded = with_memory(lambda: tiny_model(family)).merge_and_unload(pad_to_multiple_of=multiple)
        assert getattr(padded.config, width_key(padded)) == width
        for (block, kind), (plain_block, _) in zip(mlp_blocks(padded), mlp_blocks(plain), strict=True):
            assert kind.width(block) == width
            units, plain_units = kind.read_units(block), kind.read_units(plain_block)
            for tensor, plain_tensor in zip(units, plain_units, strict=True):
                if tensor is None:  # two-layer MLPs have no gate
                    continue
                assert torch.equal(tensor[: WIDTH + R], plain_tensor)  # the merged units untouched
                assert torch.count_nonzero(tensor[WIDTH + R :]) == 0  # then zero units
        torch.testing.assert_close(logits(padded, x), logits(plain, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(padded, x), unmerged, atol=1e-5, rtol=0)

    padded.save_pretrained(tmp_path / "padded")
    assert json.loads((tmp_path / "padded" / "config.json").read_text())[width_key(padded)] == 256
    assert not (tmp_path / "padded" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    assert type(reloaded) is type(plain)
    torch.testing.assert_close(logits(reloaded, x), unmerged, atol=1e-5, rtol=0)


def test_zero_units_add_nothing_even_where_the_activation_of_zero_is_not_zero():
    """A two-layer MLP unit computes ``act(k.x + b) v``: a padded unit has k = 0 and b = 0, so with a sigmoid it is
    active (0.5) and only its zero output vector v keeps it out of the output."""

    def sigmoid_gpt2():
        config = CONFIGS["gpt2"][0]()
        config.activation_function = "sigmoid"
        torch.manual_seed(0)
        return CONFIGS["gpt2"][1](config).eval()

    x = tokens()
    plain = with_memory(sigmoid_gpt2).merge_and_unload()
    padded = with_memory(sigmoid_gpt2).merge_and_unload(pad_to_multiple_of=256)
    hidden = []
    hook = padded.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda _, args: hidden.append(args[0]))
    padded_logits = logits(padded, x)
    hook.remove()
    assert torch.equal(hidden[0][..., WIDTH + R :], torch.full_like(hidden[0][..., WIDTH + R :], 0.5))
    torch.testing.assert_close(padded_logits, logits(plain, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dequantized_4bit_merge_pads_exactly(saved_bases, tmp_path, family):
    x = tokens()

    def nf4_base():
        base = load(saved_bases, family, "nf4")
        logits(base, x)  # bitsandbytes may repack 4-bit weights for its CPU kernel on the first call
        return base

    plain = with_memory(nf4_base).merge_and_unload(dequantize=True)
    padded = with_memory(nf4_base).merge_and_unload(dequantize=True, pad_to_multiple_of=256)
    assert getattr(padded.config, width_key(padded)) == 256
    assert not any(type(m).__name__ == "Linear4bit" for m in padded.modules())
    torch.testing.assert_close(logits(padded, x), logits(plain, x), atol=1e-5, rtol=0)
    padded.save_pretrained(tmp_path / "padded")
    config = json.loads((tmp_path / "padded" / "config.json").read_text())
    assert config[width_key(padded)] == 256 and "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    torch.testing.assert_close(logits(reloaded, x), logits(plain, x), atol=1e-5, rtol=0)


def test_padding_a_quantized_merge_is_refused_before_anything_changes(saved_bases):
    model = with_memory(lambda: load(saved_bases, "llama", "nf4"))
    message = (
        "pad_to_multiple_of=256 pads a full-precision merge, but MLP blocks of this model are quantized "
        "(model.layers.0.mlp, model.layers.1.mlp) and re-quantizing them to add units could round their weights. "
        "Pass dequantize=True too (the export for llama.cpp and vLLM), or leave pad_to_multiple_of out."
    )
    with pytest.raises(ValueError) as raised:
        model.merge_and_unload(pad_to_multiple_of=256)
    assert str(raised.value) == message
    layers = [m for m in model.modules() if isinstance(m, LocasLayer)]
    assert len(layers) == 2 and all(type(m.get_base_layer().up_proj).__name__ == "Linear4bit" for m in layers)


@pytest.mark.parametrize("value", [0, -256, 2.5, "256", True])
def test_bad_multiples_are_refused_before_anything_changes(value):
    model = with_memory(tiny_model)
    with pytest.raises(ValueError) as raised:
        model.merge_and_unload(pad_to_multiple_of=value)
    assert str(raised.value) == (
        f"pad_to_multiple_of must be a positive integer or None, got {value!r}: use 256 for a checkpoint that every "
        "GGUF format (k-quants included) quantizes, or None to keep the merged width."
    )
    assert sum(isinstance(m, LocasLayer) for m in model.modules()) == 2


def test_padded_down_projection_quantizes_with_gguf():
    """What llama.cpp's converter does with ``--outtype q8_0`` (``gguf.quants.quantize``, F16 on ``QuantError``): the
    merged down projection, rows of 144, cannot be Q8_0; padded to 256 it is, and its rows are whole k-quant blocks."""
    plain = with_memory(tiny_model).merge_and_unload()
    padded = with_memory(tiny_model).merge_and_unload(pad_to_multiple_of=256)
    plain_down = plain.model.layers[0].mlp.down_proj.weight.detach().numpy()
    padded_down = padded.model.layers[0].mlp.down_proj.weight.detach().numpy()
    with pytest.raises(gguf.QuantError):
        gguf.quants.quantize(plain_down, gguf.GGMLQuantizationType.Q8_0)
    q8 = gguf.quants.quantize(padded_down, gguf.GGMLQuantizationType.Q8_0)
    restored = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    assert np.all(restored[:, WIDTH + R :] == 0)  # the padding stays exactly zero through quantization
    np.testing.assert_allclose(restored[:, : WIDTH + R], plain_down, atol=np.abs(plain_down).max() / 127)
    k_quant_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][0]
    assert padded_down.shape[1] % k_quant_block == 0 and plain_down.shape[1] % k_quant_block != 0
    # what the docs and the CLI help claim: 256 is a whole number of blocks of every GGUF type
    assert all(256 % block == 0 for block, _ in gguf.GGML_QUANT_SIZES.values())


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny Llama checkpoint with a tokenizer (MLP width 128) and a Locas and a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("merge-padding")
    model = make_checkpoint(root / "model")
    adapters = {}
    for name, config in (("locas", LocasConfig(r=R, init_weights=False)), ("lora", templora_config(4))):
        torch.manual_seed(1)
        get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(root / name)
        adapters[name] = str(root / name)
    return {"model": str(model), **adapters}


def test_cli_pads_on_request_and_recommends_it_for_gguf(cli_files, tmp_path, capsys):
    merge = ["merge", "--model", cli_files["model"], "--adapter", cli_files["locas"]]
    assert cli.main([*merge, "--out", str(tmp_path / "plain")]) == 0
    out, err = capsys.readouterr()
    assert f"merged checkpoint (MLP intermediate size 128 -> 144): {tmp_path / 'plain'}" in out
    assert err.strip().splitlines()[-1] == (
        "note: the MLP width 144 is not a multiple of 32, so llama.cpp would store every ffn_down of a GGUF export "
        "in F16; for GGUF, merge with --pad-to-multiple-of 256 (zero units, same outputs)"
    )

    assert cli.main([*merge, "--out", str(tmp_path / "padded"), "--pad-to-multiple-of", "256"]) == 0
    out, err = capsys.readouterr()
    assert (
        f"merged checkpoint (MLP intermediate size 128 -> 256, padded to a multiple of 256): {tmp_path / 'padded'}"
        in out
    )
    assert "note:" not in err
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["intermediate_size"] == 144
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["intermediate_size"] == 256
    x = tokens()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    torch.testing.assert_close(logits(padded, x), logits(plain, x), atol=1e-5, rtol=0)


def test_cli_note_on_a_quantized_base_names_dequantize_too(cli_files, tmp_path, capsys):
    argv = ["merge", "--model", cli_files["model"], "--adapter", cli_files["locas"], "--out", str(tmp_path / "int8")]
    with pytest.warns(UserWarning, match="re-quantizes its weights"):  # the 8-bit merge rounds (it says so)
        assert cli.main([*argv, "--load-in-8bit"]) == 0  # int8 merges keep the width: 128 + 16
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "note: the MLP width 144 is not a multiple of 32, so llama.cpp would store every ffn_down of a GGUF export "
        "in F16; for GGUF, merge with --dequantize --pad-to-multiple-of 256 (zero units, same outputs)"
    )
    assert cli.main([*argv, "--load-in-8bit", "--overwrite", "--dequantize", "--pad-to-multiple-of", "256"]) == 0
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["intermediate_size"] == 256 and "quantization_config" not in config


@pytest.mark.parametrize(
    "extra, adapter, status, message",
    [
        (
            ["--pad-to-multiple-of", "0"],
            "locas",
            2,
            "error: peft-locas merge: argument --pad-to-multiple-of: expected an integer >= 1, got '0' "
            "(see peft-locas merge --help)",
        ),
        (
            ["--pad-to-multiple-of", "256", "--load-in-4bit"],
            "locas",
            1,
            "error: --pad-to-multiple-of pads a full-precision merge and this base is quantized: add --dequantize "
            "(the export for llama.cpp and vLLM), or leave --pad-to-multiple-of out",
        ),
        (
            ["--pad-to-multiple-of", "256"],
            "lora",
            1,
            "error: --pad-to-multiple-of applies to Locas adapters; this adapter is a LoraConfig",
        ),
    ],
    ids=["zero", "quantized-base", "lora-adapter"],
)
def test_cli_refuses_padding_it_cannot_do_exactly(cli_files, tmp_path, capsys, extra, adapter, status, message):
    argv = ["merge", "--model", cli_files["model"], "--adapter", cli_files[adapter], "--out", str(tmp_path / "out")]
    if status == 2:  # argparse's own usage error
        with pytest.raises(SystemExit) as exited:
            cli.main([*argv, *extra])
        code = exited.value.code
    else:
        code = cli.main([*argv, *extra])
    assert code == status
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line == message
    assert not (tmp_path / "out").exists()
