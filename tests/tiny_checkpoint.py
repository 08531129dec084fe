"""Tiny model folders with a real (tiny, byte-level BPE) tokenizer, built offline, for command-line tests; and a
deterministic English-like text to memorise."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = (
    "the queen said that alice would never find the small golden key under the glass table while the white rabbit "
    "ran past the garden door and the cat smiled at everyone who walked along the long dark hall"
).split()


def sample_text(words: int = 600, seed: int = 0) -> str:
    """Sentences of random words from a small vocabulary: a text a tiny model can learn something about."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        length = rng.randint(5, 12)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        count += length
    return " ".join(sentences) + "\n"


def tiny_tokenizer(vocab_size: int = 320) -> tf.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator([sample_text(seed=99)], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def make_checkpoint(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a seeded tiny Llama and the tiny tokenizer into ``folder``."""
    tokenizer = tiny_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(tokenizer, seed: int = 0, positions: int = 2048, init: float = 0.02) -> tf.LlamaForCausalLM:
    """A seeded tiny Llama (eval mode) over ``tokenizer``'s vocabulary, ``positions`` positions, weights drawn with
    standard deviation ``init``."""
    eos = tokenizer.eos_token_id
    config = tf.LlamaConfig(
        initializer_range=init,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).eval()


def stopping_llama(tokenizer) -> tf.LlamaForCausalLM:
    """A tiny Llama whose answers depend on the question (larger initial weights) and stop at different steps: its
    end-of-sequence logit is 1.2 times a common token's, so it ends an answer where that token would come."""
    model = tiny_llama(tokenizer, init=0.2)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 1.2 * model.lm_head.weight[270]
    return model


def write_texts(folder: Path, texts: dict[str, tuple[int, int]]) -> Path:
    """Write `sample_text(words, seed)` files, ``{relative path: (words, seed)}``, under ``folder``; returns it."""
    for name, (words, seed) in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(sample_text(words, seed=seed), encoding="utf-8")
    return folder
