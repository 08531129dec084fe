"""merge_and_unload() gives a vanilla checkpoint: it reloads with plain transformers, in a process that never imports
peft_locas (or peft), and reproduces the adapter model's logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from tiny_models import CONFIGS, GLU_FAMILIES, WIDTH, tiny_model, tokens

from peft_locas import LocasConfig

RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
assert "peft_locas" not in sys.modules and "peft" not in sys.modules
from safetensors.torch import load_file, save_file
out = {}
for family, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[family] = model(load_file(sys.argv[2])["input_ids"]).logits.contiguous()
assert "peft_locas" not in sys.modules
save_file(out, sys.argv[3])
"""


def _width_key(family: str) -> str:
    return "n_inner" if family == "gpt2" else "intermediate_size"


def test_merged_checkpoints_reload_without_peft_locas(tmp_path):
    x = tokens()
    save_file({"input_ids": x}, tmp_path / "inputs.safetensors")
    folders, expected = {}, {}
    for family in CONFIGS:
        model = get_peft_model(tiny_model(family), LocasConfig(r=6, init_weights=False))
        with torch.no_grad():
            expected[family] = model(x).logits
        merged = model.merge_and_unload()
        assert getattr(merged.config, _width_key(family)) == WIDTH + 6
        folders[family] = str(tmp_path / family)
        merged.save_pretrained(folders[family])
        saved_config = json.loads((tmp_path / family / "config.json").read_text())
        assert saved_config[_width_key(family)] == WIDTH + 6
        assert not (tmp_path / family / "adapter_config.json").exists()
        assert not list((tmp_path / family).glob("*.bin"))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            json.dumps(folders),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PEFT_LOCAS_NO_AUTOLOAD="1"),  # no code of ours at all, not even the start-up hook
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    reloaded = load_file(tmp_path / "out")
    for family in CONFIGS:
        diff = (reloaded[family] - expected[family]).abs().max().item()
        assert diff <= 1e-4, f"{family}: merged-and-reloaded logits differ by {diff}"


@pytest.mark.parametrize("family", GLU_FAMILIES[:1] + ("phi3", "gpt2", "gpt_neox"))
def test_merge_adapter_in_place_matches_and_unmerge_restores(family):
    x = tokens()
    model = get_peft_model(tiny_model(family), LocasConfig(r=6, init_weights=False))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x).logits
    model.merge_adapter()
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    state = model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_mixed_width_model_refuses_vanilla_export():
    model = tiny_model("llama")
    narrow = model.model.layers[0].mlp
    from peft_locas.weights.blocks import find_block_kind

    find_block_kind(narrow).keep_first_units(narrow, WIDTH - 8)
    peft_model = get_peft_model(model, LocasConfig(r=4))
    with pytest.raises(ValueError, match=r"different widths \[120, 128\].*merge_adapter\(\)"):
        peft_model.merge_and_unload()
    assert type(peft_model.base_model.model.model.layers[0].mlp).__name__ == "LocasLayer"  # left as it was
