"""Chunks of a long text as the memorisation engine reads them: token ids (of a text, token ids, a conversation or
several documents), the fixed-size chunks of TempLoRA's protocol, and chunks that begin only where a unit (a
conversation's turn, a document) begins."""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..recall.dialogue import Conversation


@dataclass(frozen=True)
class Window:
    """One chunk as the model sees it: input tokens ``[start, end)``, of which ``[first, end)`` are scored; the tokens
    before ``first`` are the attention prefix (and, for the text's first token, the one that nothing predicts)."""

    start: int
    first: int
    end: int

    @property
    def scored(self) -> int:
        return self.end - self.first

    def share(self, rank: int, world_size: int) -> Window:
        """The contiguous part of the scored tokens that ``rank`` scores, with the whole prefix before it."""
        bounds = [self.first + self.scored * k // world_size for k in range(world_size + 1)]
        return Window(self.start, bounds[rank], bounds[rank + 1])


def chunk_windows(
    num_tokens: int, chunk_tokens: int, context_tokens: int, boundaries: Sequence[int] | None = None
) -> list[Window]:
    """The chunks of ``chunk_tokens`` (the last may be shorter), with up to ``context_tokens`` of prefix.

    With ``boundaries`` (token indices where a unit, e.g. a conversation's turn, starts) every chunk ends at the last
    boundary that leaves it between ``chunk_tokens / 2`` and ``chunk_tokens`` tokens long, so chunks begin at unit
    starts and stay near their nominal size. Where no boundary falls in that range, the chunk ends at the last
    boundary before it (shorter, when the next unit is over half a chunk long and would not fit), or, with no
    boundary at all within ``chunk_tokens``, at ``chunk_tokens``: a unit longer than a chunk is split there
    (unavoidable). Prefixes keep their ``context_tokens`` and may begin inside a unit: they carry no loss. Without
    boundaries the chunks are fixed-size, as before boundaries existed.
    """
    if num_tokens < chunk_tokens:
        raise ValueError(
            f"the text has {num_tokens} tokens, fewer than one chunk of {chunk_tokens}: "
            "use a longer text or smaller chunks"
        )
    starts = sorted({b for b in boundaries if 0 < b < num_tokens}) if boundaries is not None else None
    windows = []
    chunk_start = 0
    while chunk_start < num_tokens:
        chunk_end = min(chunk_start + chunk_tokens, num_tokens)
        if starts is not None and chunk_end < num_tokens:
            inside = starts[bisect.bisect_right(starts, chunk_start) : bisect.bisect_right(starts, chunk_end)]
            near = [b for b in inside if 2 * (b - chunk_start) >= chunk_tokens]
            chunk_end = (near or inside or [chunk_end])[-1]
        start = max(0, chunk_start - context_tokens)
        window = Window(start, max(chunk_start, start + 1), chunk_end)
        if window.scored > 0:
            windows.append(window)
        chunk_start = chunk_end
    return windows


#: what separates documents memorised together (several files, a folder of files): a blank line
DOCUMENT_SEPARATOR = "\n\n"


def documents_text(documents: Sequence[str | Conversation]) -> tuple[str, list[int]]:
    """Documents memorised in order as one text: their texts (a conversation's ``render_conversation``) joined by
    `DOCUMENT_SEPARATOR`, and the character offset where each unit starts (each document, and in a conversation each
    session header and turn). Raises ``ValueError`` for an empty sequence."""
    from ..recall.dialogue import Conversation, render_conversation, turn_spans

    if not documents:
        raise ValueError("memorize: no document to memorise (an empty sequence)")
    pieces, starts, offset = [], [], 0
    for document in documents:
        if isinstance(document, Conversation):
            text = render_conversation(document)
            starts += [offset + span.start for span in turn_spans(document)]
        else:
            text = document
            starts.append(offset)
        pieces.append(text)
        offset += len(text) + len(DOCUMENT_SEPARATOR)
    return DOCUMENT_SEPARATOR.join(pieces), sorted(set(starts))


def text_and_boundaries(
    tokenizer: Any, source: Conversation | Sequence[str | Conversation]
) -> tuple[list[int], list[int]]:
    """A conversation's (or several documents', `documents_text`) token ids, exactly as ``tokenizer(text)["input_ids"]``
    of the rendered text with the tokenizer's special tokens, and the token index where each unit starts.

    A unit starts at the token holding its first character (a tokenizer's character offsets, one call). A slow
    tokenizer has no offsets: the units are then tokenized one by one (each with the separator after it) and
    concatenated, which can differ from tokenizing the whole text where a token would have spanned two units; a
    warning says so.
    """
    text, char_starts = documents_text(source if isinstance(source, (list, tuple)) else [source])
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, return_offsets_mapping=True, verbose=False)
        ids, ends = encoding["input_ids"], [end for _, end in encoding["offset_mapping"]]
        starts, token = [], 0
        for char in char_starts:  # in text order: one pass; special tokens (offsets (0, 0)) are never a unit's start
            while token < len(ids) - 1 and ends[token] <= char:
                token += 1
            starts.append(token)
        return ids, starts
    warnings.warn(
        f"{type(tokenizer).__name__} gives no character offsets: the text is tokenized unit by unit (turns, "
        "documents), which can differ from tokenizing it whole; use a fast tokenizer for identical ids",
        stacklevel=2,
    )
    cuts = char_starts[1:] + [len(text)]
    pieces = [
        tokenizer(text[start:cut], add_special_tokens=False)["input_ids"]
        for start, cut in zip(char_starts, cuts, strict=True)
    ]
    content = [token for piece in pieces for token in piece]
    ids = tokenizer.build_inputs_with_special_tokens(content)
    lead = next((i for i in range(len(ids)) if ids[i : i + len(content)] == content), 0)  # special tokens before
    return ids, [lead + offset for offset in itertools.accumulate((len(piece) for piece in pieces[:-1]), initial=0)]


def token_ids(
    tokenizer: Any, text_or_token_ids: str | Sequence[int] | torch.Tensor, max_tokens: int | None = None
) -> list[int]:
    """The text's token ids as a list (token ids given directly are taken as they are), cut to ``max_tokens``."""
    if isinstance(text_or_token_ids, str):
        if tokenizer is None:
            raise ValueError("memorize: pass a tokenizer to memorise text (or pass token ids)")
        ids = tokenizer(text_or_token_ids, verbose=False)["input_ids"]
    else:
        tensor = torch.as_tensor(text_or_token_ids)
        if tensor.dim() > 2 or (tensor.dim() == 2 and tensor.shape[0] != 1) or tensor.is_floating_point():
            raise ValueError(f"memorize: token ids must be one sequence of integers, got shape {tuple(tensor.shape)}")
        ids = tensor.reshape(-1).tolist()
    return ids[:max_tokens] if max_tokens is not None else ids


def tokens_and_boundaries(tokenizer: Any, source: Any, max_tokens: int | None) -> tuple[list[int], list[int] | None]:
    """Token ids cut to ``max_tokens``, and the unit starts for a conversation or a sequence of documents (texts and
    conversations, `documents_text`); ``None`` for one text or token ids."""
    from ..recall.dialogue import Conversation

    documents = _is_documents(source)
    if not documents and not isinstance(source, Conversation):
        return token_ids(tokenizer, source, max_tokens), None
    if tokenizer is None:
        raise ValueError(f"memorize: pass a tokenizer to memorise {'documents' if documents else 'a conversation'}")
    ids, starts = text_and_boundaries(tokenizer, source)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, [start for start in starts if start < len(ids)]


def is_conversation(source: Any) -> bool:
    """Whether what `memorize()` reads is a conversation, or documents that are all conversations (a text, token ids
    or documents with a text among them are not): it picks the instruction the memory is asked with."""
    from ..recall.dialogue import Conversation

    if _is_documents(source):
        return all(isinstance(item, Conversation) for item in source)
    return isinstance(source, Conversation)


def _is_documents(source: Any) -> bool:
    from ..recall.dialogue import Conversation

    return (
        isinstance(source, (list, tuple))
        and bool(source)
        and all(isinstance(item, (str, Conversation)) for item in source)
    )
