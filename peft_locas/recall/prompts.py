"""The words a (memorised) model is asked with: LoCoMo's question-answering instructions, for a context in the prompt
and for a memory asked without one, and the end of a long context that fits a token budget."""

from __future__ import annotations

from typing import Any

#: LoCoMo's QA instruction (``task_eval/gpt_utils.py``, ``QA_PROMPT``), for a context given in the prompt
CONTEXT_INSTRUCTION = (
    "Based on the above context, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the context whenever possible."
)
#: the same instruction for a model asked without the context, which has memorised the conversation
MEMORY_INSTRUCTION = (
    "Based on the conversation you remember, write an answer in the form of a short phrase for the following "
    "question. Answer with exact words from the conversation whenever possible."
)
#: the same instruction for a model that has memorised a text that is not a conversation (a book, a manual, notes)
TEXT_MEMORY_INSTRUCTION = (
    "Based on the text you remember, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the text whenever possible."
)


def memory_instruction(conversation: bool) -> str:
    """The instruction a memory is asked with when no context is given, and self-study trains it with:
    `MEMORY_INSTRUCTION` for a memorised conversation (or documents that are all conversations), else
    `TEXT_MEMORY_INSTRUCTION`."""
    return MEMORY_INSTRUCTION if conversation else TEXT_MEMORY_INSTRUCTION


def fit_context(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The end of ``text`` that fits in ``max_tokens`` tokens (``text`` itself when it already fits).

    The cut is made at a token boundary, then moved forward to the start of the next line when one lies within the
    first 10% (in characters) of the kept part, so a conversation does not start mid-turn. The result tokenises
    (without special tokens) to at most ``max_tokens`` tokens.

    Raises:
        ValueError: ``max_tokens`` is not a positive integer.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"fit_context: `max_tokens` must be a positive integer, got {max_tokens!r}.")
    kept = text
    while True:
        ids, starts = token_starts(tokenizer, kept)
        if len(ids) <= max_tokens:
            return kept
        if starts is not None:
            cut = kept[starts[-max_tokens] :]
        else:  # slow tokenizers have no offsets: their decoded tokens (whitespace may then differ from the text's)
            cut = tokenizer.decode(ids[-max_tokens:], clean_up_tokenization_spaces=False)
        # the cut only ever moves forward, so this loop ends (a retokenised cut can exceed the budget by a token)
        cut = cut[1:] if cut == kept else cut
        at_line_start = len(cut) < len(kept) and kept.endswith(cut) and kept[len(kept) - len(cut) - 1] == "\n"
        newline = -1 if at_line_start else cut.find("\n", 0, len(cut) // 10)
        kept = cut[newline + 1 :] if newline >= 0 else cut


def token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Token ids of ``text`` (no special tokens) and, for fast tokenizers, each token's start character."""
    # verbose=False: a long text's tokens are only counted here, never run through the model as one sequence
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return encoded["input_ids"], [start for start, _ in encoded["offset_mapping"]]
