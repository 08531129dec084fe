"""PEFT's tuner contract, as PEFT's own generic tests check it for LoRA: per-sample adapters (``adapter_names``) in
forward and in every generation mode that expands the batch, ``modules_to_save`` copies that follow those names,
``in_features`` / ``out_features`` on every tuner layer, and PEFT's own wording for mixed-batch misuse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import _get_in_out_features
from tiny_models import CONFIGS, HIDDEN, VOCAB, tiny_model, tokens

from peft_locas import LocasConfig, LocasLayer

NEW_TOKENS = 4
# prompts 0..2 name these adapters; each is compared with that prompt generated alone under that adapter
NAMES = ["other", "__base__", "default"]


def _perturb_copy(model, adapter_name: str, seed: int) -> None:
    """Make ``adapter_name``'s copy of ``lm_head`` differ from the original, as training it would."""
    copy = model.base_model.model.lm_head.modules_to_save[adapter_name]
    with torch.no_grad():
        copy.weight.add_(torch.randn(copy.weight.shape, generator=torch.Generator().manual_seed(seed)))


def _two_adapters(task_type: str | None = None, lm_head_copies: tuple[str, ...] = ("other",)):
    """A tiny Llama with memories "default" (active) and "other"; the adapters in ``lm_head_copies`` also train their
    own copy of ``lm_head`` (``modules_to_save``), perturbed so that it matters."""

    def config(name: str, r: int) -> LocasConfig:
        modules = ["lm_head"] if name in lm_head_copies else None
        # tau=1: memories strong enough to change the generated tokens on their own
        return LocasConfig(r=r, init_weights=False, tau=1.0, modules_to_save=modules, task_type=task_type)

    model = get_peft_model(tiny_model(), config("default", 4))
    model.add_adapter("other", config("other", 3))
    for seed, name in enumerate(lm_head_copies):
        _perturb_copy(model, name, seed)
    model.set_adapter("default")
    return model.eval()


def _generate(model, prompts: torch.Tensor, **settings) -> torch.Tensor:
    # min_new_tokens: no sequence stops early, so batched and single outputs have the same length
    settings.setdefault("max_new_tokens", NEW_TOKENS)
    settings.setdefault("min_new_tokens", NEW_TOKENS)
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **settings)


def _alone(model, prompt: torch.Tensor, adapter_name: str, **settings) -> torch.Tensor:
    """``prompt`` (one sample) generated with ``adapter_name`` active (``"__base__"``: adapters disabled)."""
    if adapter_name == "__base__":
        with model.disable_adapter():
            return _generate(model, prompt[None], **settings)
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        return _generate(model, prompt[None], **settings)
    finally:
        model.set_adapter(previous)


def _assert_rows_follow_names(model, prompts: torch.Tensor, out: torch.Tensor, rows: int, **settings) -> None:
    """Rows ``rows * i ...`` of ``out`` are exactly prompt ``i`` generated alone under ``NAMES[i]``, and the adapters
    do change what is generated (so the comparison could fail)."""
    assert out.shape == (len(NAMES) * rows, prompts.shape[1] + NEW_TOKENS)
    for i, name in enumerate(NAMES):
        expected = _alone(model, prompts[i], name, **settings)
        assert torch.equal(out[rows * i : rows * (i + 1)], expected), (i, name)
    under_default = [_alone(model, prompts[i], "default", **settings) for i in range(2)]
    assert not torch.equal(out[:rows], under_default[0]) and not torch.equal(out[rows : 2 * rows], under_default[1])


GENERATION_MODES = {
    "beams": (dict(num_beams=2), 1),
    "beams returning several": (dict(num_beams=3, num_return_sequences=2), 2),
    "sampling returning several": (dict(do_sample=True, top_k=1, num_return_sequences=2), 2),  # top_k=1: exact
    "generation_config": (
        dict(generation_config=tf.GenerationConfig(num_beams=2, num_return_sequences=2, max_new_tokens=NEW_TOKENS)),
        2,
    ),
}


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_generate_repeats_each_name_over_its_rows(mode):
    settings, rows = GENERATION_MODES[mode]
    model = _two_adapters()
    prompts = tokens(batch=len(NAMES), length=5)
    out = _generate(model, prompts, adapter_names=NAMES, **settings)
    _assert_rows_follow_names(model, prompts, out, rows, **settings)


def test_generate_through_the_causal_lm_model_class():
    # PeftModelForCausalLM calls the tuner's `generate`, PeftModel the base model's: both expand the names
    model = _two_adapters(task_type="CAUSAL_LM")
    assert type(model).__name__ == "PeftModelForCausalLM"
    prompts = tokens(batch=len(NAMES), length=5)
    out = _generate(model, prompts, adapter_names=NAMES, num_beams=2)
    _assert_rows_follow_names(model, prompts, out, 1, num_beams=2)


def test_generate_uses_the_models_own_generation_config_and_forward_does_not():
    model = _two_adapters()
    model.get_base_model().generation_config.num_beams = 2
    prompts = tokens(batch=len(NAMES), length=5)
    out = _generate(model, prompts, adapter_names=NAMES)
    _assert_rows_follow_names(model, prompts, out, 1)
    # a forward call is never expanded: one name per sample still
    mixed = model(prompts, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(prompts[i : i + 1]).logits
            else:
                model.set_adapter(name)
                expected = model(prompts[i : i + 1]).logits
                model.set_adapter("default")
        torch.testing.assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=0)


def _tiny_encoder_decoder() -> torch.nn.Module:
    """A seeded random T5Gemma: its encoder and decoder MLPs are Llama-style blocks that Locas wraps."""
    sub = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = tf.T5GemmaConfig(
        encoder=tf.T5GemmaModuleConfig(**sub),
        decoder=tf.T5GemmaModuleConfig(**sub),
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    return tf.T5GemmaForConditionalGeneration(config).eval()


def test_generate_with_beams_in_an_encoder_decoder_keeps_one_name_per_prompt_in_the_encoder():
    model = get_peft_model(_tiny_encoder_decoder(), LocasConfig(r=4, init_weights=False))
    model.add_adapter("other", LocasConfig(r=3, init_weights=False))
    model.eval()
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LocasLayer)]
    assert any(".encoder." in name for name in wrapped) and any(".decoder." in name for name in wrapped)
    prompts = tokens(batch=len(NAMES), length=6)
    out = _generate(model, prompts, adapter_names=NAMES, num_beams=2)
    assert out.shape[0] == len(NAMES)
    for i, name in enumerate(NAMES):
        assert torch.equal(out[i : i + 1], _alone(model, prompts[i], name, num_beams=2)), (i, name)
    assert not torch.equal(out[:1], _alone(model, prompts[0], "default", num_beams=2))


def test_modules_to_save_follow_adapter_names():
    """Each adapter's own ``lm_head`` copy serves its samples whichever adapter is active; an adapter without a copy
    (and "__base__") gets the original ``lm_head``, as when it is the active adapter."""
    model = _two_adapters(lm_head_copies=("default", "other"))
    model.add_adapter("plain", LocasConfig(r=2, init_weights=False))
    model.set_adapter("default")
    model.eval()
    x = tokens(batch=3)
    alone = {}
    with torch.no_grad():
        for name in ("default", "other", "plain"):
            model.set_adapter(name)
            alone[name] = model(x).logits
        with model.disable_adapter():
            alone["__base__"] = model(x).logits
    assert (alone["other"] - alone["default"]).abs().max() > 1  # the copies matter
    batches = (["other"] * 3, ["default"] * 3, ["other", "plain", "default"], ["__base__", "other", "plain"])
    for active in ("default", "other", "plain"):
        model.set_adapter(active)
        for names in batches:
            with torch.no_grad():
                mixed = model(x, adapter_names=names).logits
            for i, name in enumerate(names):
                difference = (mixed[i] - alone[name][i]).abs().max().item()
                assert difference <= 1e-5, (active, names, i, difference)


def _peft_in_out_features(layer: LocasLayer) -> tuple[int, int]:
    """What PEFT reads from a tuner layer (wrapping one in another adapter, for instance)."""
    with warnings.catch_warnings():
        # PEFT warns for every layer type it does not know by name, then reads `in_features` / `out_features`
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return _get_in_out_features(layer)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_layers_expose_in_and_out_features(family):
    model = get_peft_model(tiny_model(family), LocasConfig(r=4, init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LocasLayer)]
    assert layers
    for layer in layers:
        assert (layer.in_features, layer.out_features) == (HIDDEN, HIDDEN)
        assert _peft_in_out_features(layer) == (HIDDEN, HIDDEN)
    model.merge_adapter()  # appending units widens the block, not its input or output
    assert all((layer.in_features, layer.out_features) == (HIDDEN, HIDDEN) for layer in layers)


class _NarrowingMlp(torch.nn.Module):
    """A GLU block whose output (32) is narrower than its input (64), so in and out cannot be confused."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(64, 48, bias=False)
        self.up_proj = torch.nn.Linear(64, 48, bias=False)
        self.down_proj = torch.nn.Linear(48, 32, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_in_and_out_features_of_a_block_that_changes_width():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("mlp", _NarrowingMlp())
    peft_model = get_peft_model(model, LocasConfig(r=4, init_weights=False))
    layer = peft_model.base_model.model.mlp
    assert isinstance(layer, LocasLayer)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert _peft_in_out_features(layer) == (64, 32)
    assert peft_model(torch.randn(2, 3, 64)).shape == (2, 3, 32)


def test_in_and_out_features_of_a_quantized_block(saved_bases):
    pytest.importorskip("bitsandbytes")
    from quantized_bases import load

    model = get_peft_model(load(saved_bases, "llama", "nf4"), LocasConfig(r=4, init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LocasLayer)]
    assert layers and all((layer.in_features, layer.out_features) == (HIDDEN, HIDDEN) for layer in layers)


def _misuse_message(model, misuse: str) -> str:
    """The error a misuse of ``adapter_names`` raises, as ``"TypeName: text"``."""
    x = tokens(batch=3)
    try:
        if misuse == "length":
            model(x, adapter_names=["default", "default"])
        elif misuse == "length with beams":
            model.generate(input_ids=x[:2], adapter_names=["default"], num_beams=2, max_new_tokens=2)
        elif misuse == "unknown":
            model(x, adapter_names=["zeta", "default", "alpha"])
        elif misuse == "training":
            model.train()
            model(x, adapter_names=["default"] * 3)
        elif misuse == "merged":
            model.merge_adapter()
            model(x, adapter_names=["default"] * 3)
        elif misuse == "not a list":  # LoRA checks the type where it expands names, and copies them before
            names = np.array(["default"] * 3)
            model.generate(input_ids=x, adapter_names=names, num_beams=2, max_new_tokens=2)
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError(f"{misuse}: no error")


MISUSES = {
    "length": "ValueError: Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3 "
    "respectively.",
    "length with beams": "ValueError: Length of `adapter_names` should be the same as the number of inputs, but got 2 "
    "and 4 respectively.",
    "unknown": "ValueError: Trying to infer with non-existing adapter(s): alpha, zeta",
    "training": "ValueError: Cannot pass `adapter_names` when the model is in training mode.",
    "merged": "ValueError: Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
    "first.",
    "not a list": "TypeError: Got adapter names of type <class 'numpy.ndarray'>, expected a list of str.",
}


@pytest.mark.parametrize("misuse", MISUSES)
def test_misuse_raises_peft_lora_error(misuse):
    """Locas raises what LoRA raises for the same misuse, word for word (code in the ecosystem matches these texts)."""
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    locas = get_peft_model(tiny_model(), LocasConfig(r=4, init_weights=False)).eval()
    assert _misuse_message(lora, misuse) == MISUSES[misuse]
    assert _misuse_message(locas, misuse) == MISUSES[misuse]
