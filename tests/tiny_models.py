"""Tiny random models of every supported family, built offline from configs (no hub access)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 128
HIDDEN = 64  # bitsandbytes needs >= 64
WIDTH = 128  # MLP intermediate size
LAYERS = 2

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4)
_GLU = dict(_COMMON, intermediate_size=WIDTH, num_key_value_heads=2)


def _gemma(config_cls: type) -> Callable[[], tf.PretrainedConfig]:
    return lambda: config_cls(**_GLU, head_dim=16)


CONFIGS: dict[str, tuple[Callable[[], tf.PretrainedConfig], type]] = {
    "llama": (lambda: tf.LlamaConfig(**_GLU), tf.LlamaForCausalLM),
    "mistral": (lambda: tf.MistralConfig(**_GLU), tf.MistralForCausalLM),
    "qwen2": (lambda: tf.Qwen2Config(**_GLU), tf.Qwen2ForCausalLM),
    "qwen3": (lambda: tf.Qwen3Config(**_GLU, head_dim=16), tf.Qwen3ForCausalLM),
    "gemma": (_gemma(tf.GemmaConfig), tf.GemmaForCausalLM),
    "gemma2": (_gemma(tf.Gemma2Config), tf.Gemma2ForCausalLM),
    "gemma3": (_gemma(tf.Gemma3TextConfig), tf.Gemma3ForCausalLM),
    "phi3": (lambda: tf.Phi3Config(**_GLU, pad_token_id=0, bos_token_id=1, eos_token_id=2), tf.Phi3ForCausalLM),
    "gpt2": (
        lambda: tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=WIDTH, bos_token_id=0, eos_token_id=0
        ),
        tf.GPT2LMHeadModel,
    ),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(**_COMMON, intermediate_size=WIDTH), tf.GPTNeoXForCausalLM),
}
GLU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
MLP_FAMILIES = ("gpt2", "gpt_neox")


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A seeded random ``family`` model in eval mode (dropout off)."""
    make_config, model_cls = CONFIGS[family]
    torch.manual_seed(seed)
    return model_cls(make_config()).to(dtype).eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
