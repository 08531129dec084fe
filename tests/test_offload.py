"""Bases offloaded by accelerate (``device_map`` entries ``"cpu"``/``"disk"``): memories are built from the
offloaded weights, live on the execution device, compute what they compute on the same model in memory, train,
save and load; merging into an offloaded block is refused with the fix."""

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig, init_locas_weights

pytestmark = pytest.mark.usefixtures("one_thread")

#: layer 1 on disk, everything else in CPU memory (what device_map="auto" gives when layer 1 does not fit)
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload") / "base"
    tiny_model("llama").save_pretrained(folder)
    return folder


def load(checkpoint, offload_folder=None):
    if offload_folder is None:
        return AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DEVICE_MAP, offload_folder=offload_folder)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # really offloaded
    return model.eval()


def memories(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "locas_memory" in n}


def test_an_offloaded_base_gets_the_memories_and_outputs_of_the_base_in_memory(checkpoint, tmp_path):
    x = tokens(2, 16)
    config = LocasConfig(r=8)
    torch.manual_seed(0)
    plain = get_peft_model(load(checkpoint), config)
    torch.manual_seed(0)
    offloaded = get_peft_model(load(checkpoint, tmp_path / "offload"), config)
    want, got = memories(plain), memories(offloaded)
    assert want.keys() == got.keys() and len(got) == 2 * 3  # two blocks, gate/key/value each
    for name in want:
        assert got[name].device.type == "cpu"
        torch.testing.assert_close(got[name], want[name], msg=name)
    batch = [{"input_ids": tokens(2, 24, seed=3)}]
    for model in (plain, offloaded):
        init_locas_weights(model, batch, method="top_k", show_progress_bar=False)
    for name, tensor in memories(plain).items():
        torch.testing.assert_close(memories(offloaded)[name], tensor, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)

    # a training step reaches the offloaded block's memory and leaves the offloaded weights alone
    offloaded.train()
    offloaded(x, labels=x).loss.backward()
    memory = offloaded.base_model.model.model.layers[1].mlp.locas_memory["default"]
    assert memory.value.grad is not None and memory.value.grad.abs().sum() > 0  # values start at 0: keys get none yet
    assert offloaded.base_model.model.model.layers[1].mlp.base_layer.up_proj.weight.is_meta

    # saved, then loaded onto another offloaded copy: PEFT's from_pretrained cannot (refused with the recipe), the
    # recipe can
    plain.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"blocks model.layers.1 are offloaded to disk with PeftModel.from_pretrained"):
        PeftModel.from_pretrained(load(checkpoint, tmp_path / "offload2"), tmp_path / "adapter")
    reloaded = get_peft_model(load(checkpoint, tmp_path / "offload3"), LocasConfig(r=8))
    set_peft_model_state_dict(reloaded, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="Cannot merge a Locas memory into an offloaded MLP block"):
        reloaded.merge_and_unload()
    with torch.no_grad():  # the refusal changed nothing
        torch.testing.assert_close(reloaded(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)
