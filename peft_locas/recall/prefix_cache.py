"""A token prefix run through a model once and continued from copies of its KV cache (`PrefixCache`), and what that
needs to know of a ``transformers`` causal LM: the name of its cache argument, its positions, its end-of-sequence ids,
its device, and a key for its current state (adapters on or off, weights changed in place)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .attention import grouped_query_attention

#: how many model states (e.g. adapter on, adapter disabled) keep a prefilled prefix cache at once
_KEPT_PREFIX_CACHES = 2


class Continuation(NamedTuple):
    """What `PrefixCache.decode()` and `Asker.continue_from()` decoded.

    ``ids``: the new token ids in order, a stopping end-of-sequence id included. ``logits``: the logits that chose
    them, ``(len(ids), vocab)`` in the model's dtype and on its device (row ``i`` chose ``ids[i]``); ``(0, 0)`` when
    nothing was decoded (the prompt already filled the model's positions).
    """

    ids: list[int]
    logits: torch.Tensor


class PrefixCache:
    """A token prefix run through ``model`` once, its KV cache continued by copies: the shared prefill behind `Asker`
    and self-study's question writer (`peft_locas.engine.self_study.write_questions`).

    The cache is prefilled on first use and kept per model state (device, dtype, the PEFT layers' active / disabled /
    merged adapters, the parameters' in-place version counters; the last two states' caches), so ``with
    model.disable_adapter():``, or weights trained further, get their own prefill.

    Args:
        model: a causal LM (``PeftModel``, merged or plain ``transformers`` model) on any device.
        prefix_ids: the prefix's token ids, int64 ``(prefix_tokens,)`` (special tokens as the model should see them).

    Raises:
        ValueError: ``prefix_ids`` is empty or not one-dimensional.
    """

    def __init__(self, model: torch.nn.Module, prefix_ids: torch.Tensor) -> None:
        prefix_ids = torch.as_tensor(prefix_ids, dtype=torch.long)
        if prefix_ids.dim() != 1 or len(prefix_ids) == 0:
            raise ValueError(
                f"PrefixCache: `prefix_ids` must be a non-empty 1-D tensor of token ids, got shape "
                f"{tuple(prefix_ids.shape)}."
            )
        self.model = model
        #: the prefix's token ids, int64 ``(prefix_tokens,)``, on the CPU
        self.prefix_ids = prefix_ids.cpu()
        #: the KV cache's argument and output name in the model's forward (`cache_argument()`)
        self.cache_argument = cache_argument(model)
        #: the model's positions (`max_positions()`), ``None`` when its config names none
        self.max_positions = max_positions(model)
        self._caches: dict[tuple, Any] = {}

    def prefilled(self) -> Any:
        """The prefix's KV cache (a ``transformers`` cache of batch 1 holding ``prefix_tokens`` positions) for the
        model's current state, prefilled in eval mode without gradients on first use.

        A forward appends to the cache it is given: continue a ``copy.deepcopy`` of it, never the cache itself.
        """
        key = model_state(self.model)
        if key not in self._caches:
            with evaluating(self.model):
                ids = self.prefix_ids[None].to(model_device(self.model))
                output = self.model(input_ids=ids, use_cache=True, **logits_to_keep(self.model, 1))
            while len(self._caches) >= _KEPT_PREFIX_CACHES:
                self._caches.pop(next(iter(self._caches)))
            self._caches[key] = getattr(output, self.cache_argument)
        return self._caches[key]

    def decode(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_ids: Sequence[int] = (),
        pick: Callable[[torch.Tensor], int] | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> Continuation:
        """New token ids after the prefix and ``tokens`` (int64 ``(n,)``, ``n >= 1``), decoded one at a time from a
        copy of the prefilled cache, in eval mode without gradients (the model's training mode is restored).

        Each id is ``pick(logits)`` of the logits ``(vocab,)`` predicting it (default: the greedy argmax). Decoding
        stops after an id of ``eos_token_ids`` (kept), once ``stop(new ids so far)`` is true, after
        ``max_new_tokens`` ids, or at the model's last position (nothing at all when the prefix and ``tokens`` already
        fill the model's positions).

        Raises:
            ValueError: ``tokens`` is empty or not one-dimensional, or ``max_new_tokens`` is not a positive integer.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 1 or len(tokens) == 0:
            raise ValueError(
                f"PrefixCache.decode: `tokens` must be a non-empty 1-D tensor of token ids, got shape "
                f"{tuple(tokens.shape)}."
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(
                f"PrefixCache.decode: `max_new_tokens` must be a positive integer, got {max_new_tokens!r}."
            )
        pick = greedy if pick is None else pick
        seen = len(self.prefix_ids)
        limit = max_new_tokens
        if self.max_positions is not None:
            limit = min(limit, self.max_positions - seen - len(tokens))
        if limit < 1:
            return Continuation([], torch.empty(0, 0))
        device = model_device(self.model)
        new_ids: list[int] = []
        logits: list[torch.Tensor] = []
        with evaluating(self.model), grouped_query_attention(self.model):
            cache = copy.deepcopy(self.prefilled())
            step = tokens.to(device)
            while len(new_ids) < limit:
                seen += len(step)
                # the cache holds the earlier positions: the mask covers them, the forward only the new tokens
                mask = torch.ones(1, seen, dtype=torch.long, device=device)
                output = self.model(
                    input_ids=step[None], attention_mask=mask, use_cache=True, **{self.cache_argument: cache}
                )
                cache = getattr(output, self.cache_argument)
                logits.append(output.logits[0, -1])
                new_ids.append(pick(logits[-1]))
                if new_ids[-1] in eos_token_ids or (stop is not None and stop(new_ids)):
                    break
                step = torch.tensor([new_ids[-1]], dtype=torch.long, device=device)
        return Continuation(new_ids, torch.stack(logits))


def accepts_argument(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes a keyword argument ``name`` (e.g. ``"position_ids"``, ``"logits_to_keep"``).

    A ``PeftModel`` forwards ``**kwargs``: the wrapped ``transformers`` class's forward is the one read.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(type(base).forward).parameters


def cache_argument(model: torch.nn.Module) -> str:
    """The KV cache's argument and output name in ``model``'s forward: ``"cache"`` (``transformers`` >= 5.2x) or
    ``"past_key_values"``."""
    return "cache" if accepts_argument(model, "cache") else "past_key_values"


def max_positions(model: torch.nn.Module) -> int | None:
    """The positions ``model`` takes (its text config's ``max_position_embeddings``), ``None`` when it names none."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) else None


def end_of_sequence_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The ids an answer stops at, sorted: the tokenizer's end-of-sequence id and the generation config's
    (``eos_token_id``, one id or a list)."""
    eos = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    return sorted({i for e in eos for i in ([e] if isinstance(e, int) else e or [])})


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def model_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def logits_to_keep(model: torch.nn.Module, count: int) -> dict[str, int]:
    """``logits_to_keep=count`` for a forward that takes it (only the last ``count`` positions' logits are made)."""
    return {"logits_to_keep": count} if accepts_argument(model, "logits_to_keep") else {}


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's training mode is restored on leaving."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def model_state(model: torch.nn.Module) -> tuple:
    """What a prefix cache depends on: device and dtype, the PEFT layers' adapter state, and the weights' versions
    (in-place updates, e.g. optimiser steps or ``load_state_dict``, bump a tensor's version counter)."""
    weight = model.get_input_embeddings().weight
    adapters = tuple(
        (module.disable_adapters, tuple(module.active_adapters), tuple(module.merged_adapters))
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
    )
    weights = tuple((id(p), p._version) for p in model.parameters())
    return weight.device, weight.dtype, adapters, weights
