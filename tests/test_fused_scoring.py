"""Scoring each chunk from its first training step's forward (`MemorizeConfig.fused_scoring`): one forward fewer per
chunk, the same losses and adapter weights as the two-pass run, and the two-pass run wherever dropout makes training
forwards differ from scoring ones."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tiny_models import VOCAB, tiny_model

from peft_locas import LocasConfig
from peft_locas.engine.memorization import MemorizeConfig, fuses_scoring, has_dropout, memorize, templora_config

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(chunk_tokens=24, context_tokens=8, steps_per_chunk=2, lr=2e-2, compare_baseline=True)


def ids(n: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def run(peft_config, fused, family="llama", **settings):
    """The run's result and the number of forward passes of the base model (the adapter disabled ones included)."""
    model = tiny_model(family)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    config = MemorizeConfig(**{**SETTINGS, **settings}, fused_scoring=fused)
    return memorize(model, None, ids(), config, peft_config=peft_config), len(calls)


def assert_same_run(fused, two_pass) -> None:
    for field in ("losses", "baseline_losses", "train_losses", "token_counts"):
        assert getattr(fused, field) == pytest.approx(getattr(two_pass, field), rel=1e-5, abs=1e-6), field
    mine, theirs = get_peft_model_state_dict(fused.model), get_peft_model_state_dict(two_pass.model)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "name, peft_config, settings",
    [
        ("locas ntp", LocasConfig(r=8), {}),
        ("locas distill", LocasConfig(r=8), dict(objective="distill", teacher_context_tokens=64, ntp_weight=0.5)),
        ("lora without dropout", LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), {}),
    ],
)
def test_fused_scoring_equals_two_passes_with_one_forward_fewer_per_chunk(name, peft_config, settings):
    fused, fused_calls = run(peft_config, None, **settings)
    two_pass, two_pass_calls = run(peft_config, False, **settings)
    assert_same_run(fused, two_pass)
    chunks = len(two_pass.losses)
    assert two_pass_calls - fused_calls == chunks, name


def test_dropout_keeps_two_passes():
    """TempLoRA's lora_dropout (0.05) and GPT-2's residual dropout make a training forward differ from scoring's."""
    assert has_dropout(tiny_model("gpt2")) and not has_dropout(tiny_model("llama"))
    auto, auto_calls = run(templora_config(4), None)
    assert not fuses_scoring(auto.model, MemorizeConfig(**SETTINGS))
    two_pass, two_pass_calls = run(templora_config(4), False)
    assert auto.losses == two_pass.losses and auto_calls == two_pass_calls
    assert not fuses_scoring(auto.model, MemorizeConfig(**{**SETTINGS, "steps_per_chunk": 0}, fused_scoring=True))
    with pytest.raises(ValueError, match="`fused_scoring` must be True, False or None, got 1"):
        MemorizeConfig(fused_scoring=1)


def test_batched_memorisation_fuses_too():
    texts = [ids(120, 0), ids(80, 1)]
    results = {}
    for fused in (None, False):
        config = MemorizeConfig(**SETTINGS, fused_scoring=fused)
        results[fused] = memorize(
            tiny_model(), None, texts, config, peft_config=LocasConfig(r=8), adapter_names=["first", "second"]
        )
    for fused, two_pass in zip(results[None], results[False], strict=True):
        assert fused.losses == pytest.approx(two_pass.losses, rel=1e-5, abs=1e-6)
        assert fused.train_losses == pytest.approx(two_pass.train_losses, rel=1e-5, abs=1e-6)
