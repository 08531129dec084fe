"""Chunks of a long text as the memorisation engine reads them: token ids (of a text, token ids or a conversation),
the fixed-size chunks of TempLoRA's protocol, and for conversations chunks that begin only where a turn begins."""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .recall.dialogue import Conversation


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


def text_and_boundaries(tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[int]]:
    """A conversation's token ids (``render_conversation``'s text, with the tokenizer's special tokens, exactly as
    ``tokenizer(text)["input_ids"]``) and the token index where each rendered unit (session header or turn) starts.

    A unit starts at the token holding its first character (a tokenizer's character offsets, one call). A slow
    tokenizer has no offsets: the units are then tokenized one by one (each with the separator after it) and
    concatenated, which can differ from tokenizing the whole text where a token would have spanned two units; a
    warning says so.
    """
    from .recall.dialogue import render_conversation, turn_spans

    text, spans = render_conversation(conversation), turn_spans(conversation)
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, return_offsets_mapping=True, verbose=False)
        ids, ends = encoding["input_ids"], [end for _, end in encoding["offset_mapping"]]
        starts, token = [], 0
        for span in spans:  # in text order: one pass; special tokens (offsets (0, 0)) are never a unit's start
            while token < len(ids) - 1 and ends[token] <= span.start:
                token += 1
            starts.append(token)
        return ids, starts
    warnings.warn(
        f"{type(tokenizer).__name__} gives no character offsets: the conversation is tokenized turn by turn, which "
        "can differ from tokenizing its whole text; use a fast tokenizer for identical ids",
        stacklevel=2,
    )
    cuts = [span.start for span in spans[1:]] + [len(text)]
    pieces = [
        tokenizer(text[span.start : cut], add_special_tokens=False)["input_ids"]
        for span, cut in zip(spans, cuts, strict=True)
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
    """Token ids cut to ``max_tokens``, and the unit starts for a conversation (``None`` for a text or ids)."""
    from .recall.dialogue import Conversation

    if not isinstance(source, Conversation):
        return token_ids(tokenizer, source, max_tokens), None
    if tokenizer is None:
        raise ValueError("memorize: pass a tokenizer to memorise a conversation")
    ids, starts = text_and_boundaries(tokenizer, source)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, [start for start in starts if start < len(ids)]
