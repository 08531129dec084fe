"""Serving many memories from one base model: each question answered by the memory it names, several memories in one
batch (PEFT's per-sample ``adapter_names``), so N memories cost one model in memory and batched decoding.

Unlike `Asker.ask_many`, rows cannot share one prefilled prefix: a memory changes every layer's hidden states, so
each row's prompt (the asker's prefix, then its question) is read whole. Prompts and answers are exactly `Asker.ask`'s
for the memory a row names (up to float rounding; see `Asker.ask_many` on batched rounding).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .asking import Answer, Asker
from .attention import grouped_query_attention

#: PEFT's name for "no adapter" in ``adapter_names``
BASE = "__base__"


def ask_memories(
    asker: Asker, requests: Sequence[tuple[str, str]], *, max_new_tokens: int | None = None, batch_size: int = 8
) -> list[Answer]:
    """Greedy answers to ``requests``, ``(adapter_name, question)`` pairs, in their order, each by the memory it names
    (`BASE`, ``"__base__"``: the model without memory), in batches of up to ``batch_size`` rows.

    Args:
        asker: an `Asker` over a ``PeftModel`` holding every named adapter (its prompt settings and context apply to
            every row).
        requests: ``(adapter_name, question)`` pairs.
        max_new_tokens: answer length limit in tokens (default: the asker's).
        batch_size: rows per batch.

    Returns:
        one `Answer` per request; ``seconds`` is its batch's wall time shared equally by its rows.

    Raises:
        ValueError: an adapter the model does not hold, an empty question, a prompt plus answer longer than the
            model's positions, or a ``batch_size`` that is not a positive integer (all checked before any answer).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"ask_memories: batch_size must be a positive integer, got {batch_size!r}")
    held = set(getattr(asker.model, "peft_config", {}))
    unknown = sorted({name for name, _ in requests if name != BASE and name not in held})
    if unknown:
        raise ValueError(f"ask_memories: the model holds no adapter {', '.join(map(repr, unknown))}")
    limit = asker.max_new_tokens if max_new_tokens is None else max_new_tokens
    prompts = [asker.prompt_ids(question)[0] for _, question in requests]
    for prompt in prompts:
        if asker.max_positions is not None and len(prompt) + limit > asker.max_positions:
            raise ValueError(
                f"ask_memories: a prompt of {len(prompt)} tokens and {limit} new tokens exceed the model's "
                f"{asker.max_positions} positions"
            )
    answers = []
    for first in range(0, len(requests), batch_size):
        rows = range(first, min(first + batch_size, len(requests)))
        start = time.perf_counter()
        new_ids = _generate([prompts[i] for i in rows], [requests[i][0] for i in rows], limit, asker)
        seconds = (time.perf_counter() - start) / len(rows)
        for row, ids in zip(rows, new_ids, strict=True):
            kept = _without_eos(ids, asker.eos_token_ids)
            answers.append(
                Answer(
                    question=requests[row][1],
                    text=asker.tokenizer.decode(
                        kept, skip_special_tokens=True, clean_up_tokenization_spaces=False
                    ).strip(),
                    prompt_tokens=len(prompts[row]),
                    new_tokens=len(ids),
                    seconds=seconds,
                )
            )
    return answers


@torch.no_grad()
def _generate(prompts: Sequence[torch.Tensor], adapters: Sequence[str], limit: int, asker: Asker) -> list[list[int]]:
    """Each prompt's new token ids, a stopping end-of-sequence id included: left-padded prompts, greedy ``generate``
    with one adapter name per row."""
    pad = asker.tokenizer.pad_token_id
    pad = pad if pad is not None else (asker.eos_token_ids or [0])[0]
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    device = next(asker.model.parameters()).device
    was_training = asker.model.training
    asker.model.eval()
    try:
        # grouped-query heads are not repeated under the padding mask (`peft_locas.recall.attention`)
        with grouped_query_attention(asker.model):
            output = asker.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                adapter_names=list(adapters),
                max_new_tokens=limit,
                do_sample=False,
                num_beams=1,
                eos_token_id=asker.eos_token_ids or None,
                pad_token_id=pad,
            )
    finally:
        asker.model.train(was_training)
    return [_until_eos(row[longest:].tolist(), asker.eos_token_ids) for row in output]


def _until_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    """Up to and including the first end-of-sequence id (rows that stopped early are padded after it)."""
    for index, token in enumerate(ids):
        if token in eos:
            return ids[: index + 1]
    return ids


def _without_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids
