"""Stand-ins for a real checkpoint, so that every docs example runs offline in seconds.

``tiny_model_dir("llama")`` returns a folder that looks exactly like a downloaded Hugging Face checkpoint
(``config.json``, ``model.safetensors``, a tokenizer), holding a randomly initialised 2-layer model: a Llama (GLU
MLP, so a Locas-GLU memory) or a GPT-2 (two-layer MLP, so a Locas-MLP memory). The tokenizer is byte-level (one token
per UTF-8 byte), so any text works. In your own code, pass a model id or folder instead, e.g.
``"HuggingFaceTB/SmolLM2-135M"``.

The folders are built once per machine under ``$PEFT_LOCAS_DOCS_TMP`` (default: the system temp directory).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

FAMILIES = ("llama", "gpt2")

TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.
However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is
so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or
other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"
Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."
Mr. Bennet made no answer.
"Do not you want to know who has taken it?" cried his wife impatiently.
"You want to tell me, and I have no objection to hearing it."
This was invitation enough.
"""


def sample_text(repeat: int = 1) -> str:
    """The opening of *Pride and Prejudice* (public domain), ``repeat`` times."""
    return TEXT * repeat


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special)


def _model(family: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=320, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if family == "llama":
        config = tf.LlamaConfig(
            **common,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        config = tf.GPT2Config(**common, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=1024)
        return tf.GPT2LMHeadModel(config)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def tiny_model_dir(family: str = "llama") -> str:
    """A folder with a tiny random ``family`` checkpoint and its tokenizer, built on first use."""
    root = Path(os.environ.get("PEFT_LOCAS_DOCS_TMP") or Path(tempfile.gettempdir()) / "peft-locas-docs")
    folder = root / family
    if (folder / "done").exists():
        return str(folder)
    model = _model(family)  # raises on an unknown family before anything is written
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
    model.save_pretrained(build)
    _tokenizer().save_pretrained(build)
    (build / "done").touch()
    try:
        os.rename(build, folder)
    except OSError:  # another process built it first
        shutil.rmtree(build, ignore_errors=True)
    return str(folder)
