"""LocasConfig: defaults, JSON round trip, and validation errors that name the problem and the fix."""

import json

import pytest
from peft import NoMatchingPeftModuleError, PeftConfig, get_peft_model
from tiny_models import tiny_model

from peft_locas import LocasConfig


def test_defaults():
    config = LocasConfig()
    assert (config.r, config.variant, config.tau, config.max_norm, config.init_weights) == (
        64,
        "auto",
        "auto",
        1.0,
        True,
    )
    assert config.target_modules is None


def test_json_round_trip(tmp_path):
    config = LocasConfig(
        r=7,
        variant="glu",
        target_modules=["mlp"],
        layers_to_transform=[1],
        layers_pattern="layers",
        tau=0.5,
        max_norm=None,
        init_weights="gaussian",
        exclude_modules=["model.layers.0.mlp"],
        modules_to_save=["lm_head"],
    )
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["r"] == 7 and on_disk["tau"] == 0.5 and on_disk["max_norm"] is None
    assert on_disk["target_modules"] == ["mlp"] and on_disk["init_weights"] == "gaussian"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LocasConfig)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` must be a positive integer"),
        ({"r": 2.5}, "`r` must be a positive integer"),
        ({"variant": "moe"}, "unknown `variant` 'moe'; choose one of auto, glu, mlp"),
        ({"tau": -1.0}, "`tau` must be 'auto' or a positive number"),
        ({"tau": "big"}, "`tau` must be 'auto' or a positive number"),
        ({"max_norm": 0}, "`max_norm` must be a positive number, or None to disable clipping"),
        ({"init_weights": "top_k"}, "unknown `init_weights` 'top_k'"),
        ({"layers_pattern": "layers"}, "`layers_pattern` only applies together with `layers_to_transform`"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LocasConfig(**kwargs)


def test_mlp_variant_on_glu_block_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"variant='mlp'\) does not fit 'model.layers.0.mlp', a SplitGlu\(glu\) block.*'glu' or 'auto'"
    ):
        get_peft_model(model, LocasConfig(r=4, variant="mlp"))
    assert not any("locas" in name for name, _ in model.named_modules()), (
        "a failed config must leave the model as it was"
    )


def test_glu_variant_on_two_layer_block_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"variant='glu'\) does not fit 'transformer.h.0.mlp', a TwoLayerMlp\(c_fc->act->c_proj\) block",
    ):
        get_peft_model(tiny_model("gpt2"), LocasConfig(r=4, variant="glu"))


def test_single_projection_target_is_rejected():
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' is a Linear, not an MLP block.*whole MLP"):
        get_peft_model(tiny_model("llama"), LocasConfig(r=4, target_modules=["gate_proj"]))


def test_no_match_lists_the_blocks():
    with pytest.raises(
        NoMatchingPeftModuleError, match=r"matched no MLP block.*model.layers.0.mlp, model.layers.1.mlp"
    ):
        get_peft_model(tiny_model("llama"), LocasConfig(r=4, target_modules=["feed_forward"]))
    with pytest.raises(NoMatchingPeftModuleError, match=r"layers_to_transform=\[5\]"):
        get_peft_model(tiny_model("llama"), LocasConfig(r=4, layers_to_transform=[5]))


def test_r_above_width_is_rejected_for_cloning():
    with pytest.raises(ValueError, match=r"r=129\) exceeds the MLP's intermediate size 128.*init_weights='gaussian'"):
        get_peft_model(model := tiny_model("llama"), LocasConfig(r=129))
    assert not any("locas" in name for name, _ in model.named_modules())
    get_peft_model(tiny_model("llama"), LocasConfig(r=129, init_weights="gaussian"))  # no cloning, no limit


def test_model_without_mlp_blocks():
    import torch

    with pytest.raises(ValueError, match="found no MLP block in Sequential.*recognised layout.*not supported yet"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LocasConfig(r=2))
