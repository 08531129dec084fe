"""Memorising a conversation: chunks that begin at session headers and turns (never inside a turn, unless it is
longer than a chunk), the very tokens of the rendered text, and `memorize` / `evaluate` on a small `Conversation`."""

from __future__ import annotations

import random
import re

import pytest
import torch
import transformers as tf
from tiny_checkpoint import WORDS, tiny_tokenizer
from tokenizers import processors

from peft_locas import LocasConfig
from peft_locas.engine.checkpointing import CheckpointError
from peft_locas.engine.chunking import Window, chunk_windows, text_and_boundaries
from peft_locas.engine.memorization import MemorizeConfig, evaluate, memorize
from peft_locas.recall.dialogue import Conversation, Session, Turn, render_conversation, turn_spans

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> tf.PreTrainedTokenizerFast:
    return tiny_tokenizer()


def conversation(sessions: int = 3, turns: int = 8, seed: int = 0) -> Conversation:
    """Two speakers taking turns of 3 to 14 words, dated sessions (the last without a date)."""
    rng = random.Random(seed)

    def turn(number: int, k: int) -> Turn:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."
        return Turn("Ann" if k % 2 else "Bob", text, dia_id=f"D{number}:{k + 1}")

    return Conversation(
        sample_id="tiny",
        sessions=tuple(
            Session(n, f"{n} May 2023" if n < sessions else None, tuple(turn(n, k) for k in range(turns)))
            for n in range(1, sessions + 1)
        ),
    )


def tiny_llama(vocab_size: int) -> tf.LlamaForCausalLM:
    config = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def chunk_starts(windows: list[Window]) -> list[int]:
    return [0] + [window.end for window in windows[:-1]]


# ------------------------------------------------------------------------------------------------ chunking
def test_chunks_end_at_the_last_unit_start_that_keeps_them_near_full_size():
    windows = chunk_windows(120, 32, 8, boundaries=[0, 10, 25, 31, 50, 58, 90, 100])
    assert windows == [Window(0, 1, 31), Window(23, 31, 58), Window(50, 58, 90), Window(82, 90, 120)]
    # a short unit then one longer than a chunk: the short one is a chunk, the long one is split every 32 tokens
    assert chunk_windows(100, 32, 8, boundaries=[0, 5, 80]) == [
        Window(0, 1, 5),
        Window(0, 5, 37),
        Window(29, 37, 69),
        Window(61, 69, 100),  # the last chunk takes the rest of the text
    ]
    # no unit starts at all: the fixed windows of a plain text
    assert chunk_windows(130, 40, 16, boundaries=[]) == chunk_windows(130, 40, 16)


@pytest.mark.parametrize("seed", range(5))
def test_chunks_start_on_unit_starts_except_inside_units_longer_than_a_chunk(seed):
    rng = random.Random(seed)
    chunk, context = 32, 12
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(10, 30), rng.randint(33, 80)]) for _ in range(60)]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    total = sum(lengths)
    windows = chunk_windows(total, chunk, context, boundaries=starts)
    assert windows[-1].end == total and sum(w.scored for w in windows) == total - 1  # every token once
    for begin, window in zip(chunk_starts(windows), windows, strict=True):
        unit = max(k for k, start in enumerate(starts) if start <= begin)
        assert begin in starts or lengths[unit] > chunk, (begin, lengths[unit])
        assert window.start == max(0, begin - context) and window.end - begin <= chunk
        if window.end < total and window.end - begin < chunk / 2:  # short only when no unit start allowed more
            assert not [b for b in starts if begin + chunk / 2 <= b <= begin + chunk], window


# ------------------------------------------------------------------------------------------------ tokens
def test_text_and_boundaries_are_the_rendered_texts_tokens(tokenizer):
    dialogue = conversation()
    text, spans = render_conversation(dialogue), turn_spans(dialogue)
    ids, starts = text_and_boundaries(tokenizer, dialogue)
    assert ids == tokenizer(text)["input_ids"]
    assert len(starts) == len(spans) and starts[0] == 0 and starts == sorted(set(starts))
    cuts = [span.start for span in spans[1:]] + [len(text)]
    for span, cut, start, end in zip(spans, cuts, starts, starts[1:] + [len(ids)], strict=True):
        assert tokenizer.decode(ids[start:end]) == text[span.start : cut]  # each unit's tokens, separator after it

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.eos_token_id)]
    )
    try:
        with_bos, shifted = text_and_boundaries(tokenizer, dialogue)
    finally:
        tokenizer.backend_tokenizer.post_processor = None
    assert with_bos == [tokenizer.eos_token_id] + ids and shifted == [start + 1 for start in starts]


class CharTokenizer(tf.PreTrainedTokenizer):
    """A slow (pure Python) tokenizer, one token per ASCII character: it has no character offsets."""

    def __init__(self, **kwargs):
        self.vocab = {chr(i): i for i in range(128)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 128

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)


def test_a_slow_tokenizer_reads_the_conversation_unit_by_unit():
    dialogue, slow = conversation(sessions=2, turns=3), CharTokenizer()
    with pytest.warns(
        UserWarning, match="CharTokenizer gives no character offsets: the text is tokenized unit by unit"
    ):
        ids, starts = text_and_boundaries(slow, dialogue)
    assert ids == [ord(c) for c in render_conversation(dialogue)]  # characters: the same as the whole text's
    assert starts == [span.start for span in turn_spans(dialogue)]


# ------------------------------------------------------------------------------------------------ memorising
@pytest.mark.parametrize("objective", ["ntp", "distill"])
def test_memorize_and_evaluate_a_conversation(tokenizer, objective):
    dialogue = conversation()
    ids, starts = text_and_boundaries(tokenizer, dialogue)
    windows = chunk_windows(len(ids), 48, 16, starts)
    assert all(begin in starts for begin in chunk_starts(windows))  # turns here are shorter than a chunk
    assert any(w.end - begin < 48 for begin, w in zip(chunk_starts(windows), windows[:-1], strict=True))
    config = MemorizeConfig(
        chunk_tokens=48, context_tokens=16, steps_per_chunk=1, lr=1e-2, compare_baseline=True, objective=objective
    )
    result = memorize(tiny_llama(len(tokenizer)), tokenizer, dialogue, config, peft_config=LocasConfig(r=8))
    assert result.token_counts == [w.scored for w in windows] and len(result.train_losses) == len(windows)
    plain = memorize(tiny_llama(len(tokenizer)), None, ids, config, peft_config=LocasConfig(r=8))
    assert plain.token_counts != result.token_counts  # the same tokens, chunked at fixed places
    assert result.losses[0] == pytest.approx(result.baseline_losses[0], rel=1e-6)  # scored before any training
    scored = evaluate(result.model, tokenizer, dialogue, chunk_tokens=48, context_tokens=16, max_tokens=150)
    cut = chunk_windows(150, 48, 16, [start for start in starts if start < 150])
    assert scored.token_counts == [w.scored for w in cut] and sum(scored.token_counts) == 149


def test_a_conversation_run_does_not_resume_a_plain_run_of_its_tokens(tokenizer, tmp_path):
    dialogue = conversation(sessions=2)
    ids, _ = text_and_boundaries(tokenizer, dialogue)
    config = MemorizeConfig(chunk_tokens=48, context_tokens=16, steps_per_chunk=1, checkpoint_dir=tmp_path)
    memorize(tiny_llama(len(tokenizer)), tokenizer, dialogue, config, peft_config=LocasConfig(r=8))
    with pytest.raises(CheckpointError, match=r"\(settings: unit_starts_sha256 '[0-9a-f]{64}' -> None\)"):
        memorize(tiny_llama(len(tokenizer)), None, ids, config, peft_config=LocasConfig(r=8))
    with pytest.raises(ValueError, match=f"^{re.escape('memorize: pass a tokenizer to memorise a conversation')}$"):
        memorize(tiny_llama(len(tokenizer)), None, dialogue, config, peft_config=LocasConfig(r=8))
