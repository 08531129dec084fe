"""Saving and loading Locas adapters through PEFT's own entry points (safetensors only)."""

import json
import shutil
import types

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_model, tokens

from peft_locas import LocasConfig, LocasLayer


@pytest.fixture
def trained(tmp_path):
    """A base model saved to disk, and a non-identity Locas adapter on it saved beside it."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model().save_pretrained(base_dir)
    base = type(tiny_model()).from_pretrained(base_dir).eval()
    model = get_peft_model(base, LocasConfig(r=4, init_weights=False))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def test_saved_files_and_contents(trained):
    _, adapter_dir, model = trained
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["mlp"] and config["tau"] == "auto"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    expected = {
        f"base_model.model.model.layers.{i}.mlp.locas_memory.{part}"
        for i in range(2)
        for part in ("gate", "key", "value", "tau")
    }
    assert set(tensors) == expected
    layer = model.base_model.model.model.layers[0].mlp
    assert torch.equal(
        tensors["base_model.model.model.layers.0.mlp.locas_memory.key"], layer.locas_memory["default"].key
    )
    assert torch.equal(
        tensors["base_model.model.model.layers.0.mlp.locas_memory.tau"], layer.locas_memory["default"].tau
    )
    assert tensors["base_model.model.model.layers.0.mlp.locas_memory.value"].dtype == torch.float32


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peft_model_from_pretrained_round_trip(trained, low_cpu_mem_usage):
    base_dir, adapter_dir, model = trained
    x = tokens()
    expected = model(x).logits
    fresh = type(tiny_model()).from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(fresh, adapter_dir, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(loaded.peft_config["default"], LocasConfig)
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_trainable_load_and_second_adapter(trained):
    base_dir, adapter_dir, model = trained
    fresh = type(tiny_model()).from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(fresh, adapter_dir, is_trainable=True)
    assert {n.split(".")[-2] for n, p in loaded.named_parameters() if p.requires_grad} == {"default"}
    loaded.load_adapter(adapter_dir, adapter_name="copy")
    layer = next(m for m in loaded.modules() if isinstance(m, LocasLayer))
    assert torch.equal(layer.locas_memory["copy"].value, layer.locas_memory["default"].value)


def test_peft_config_and_auto_model(trained):
    base_dir, adapter_dir, model = trained
    config = PeftConfig.from_pretrained(adapter_dir)
    assert isinstance(config, LocasConfig) and config.base_model_name_or_path == str(base_dir)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    x = tokens()
    torch.testing.assert_close(auto(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_only_safetensors_are_written(trained, tmp_path):
    _, _, model = trained
    model.save_pretrained(tmp_path / "again")
    assert not list((tmp_path / "again").glob("*.bin"))


def test_push_to_hub_uploads_a_loadable_adapter(trained, tmp_path, monkeypatch):
    """No hub is reachable here: the hub client is replaced by a recorder of what would be uploaded."""
    import transformers.utils.hub as hub

    base_dir, _, model = trained
    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(
        hub,
        "hf_api",
        lambda: types.SimpleNamespace(create_repo=lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id)),
    )
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda *a, **kw: types.SimpleNamespace(save=lambda path: None)
    )
    monkeypatch.setattr(
        type(model),
        "_upload_modified_files",
        lambda self, working_dir, repo_id, **kw: shutil.copytree(working_dir, uploaded),
    )
    model.push_to_hub("someone/locas-adapter")
    assert (uploaded / "adapter_model.safetensors").exists()
    fresh = type(tiny_model()).from_pretrained(base_dir).eval()
    x = tokens()
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, uploaded)(x).logits, model(x).logits)
