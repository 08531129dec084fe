"""Attention for a batch of continuations of one long prefix: the prefix's keys and values are kept once and read once
per layer for every row, and grouped-query heads are never repeated.

``transformers``' ``sdpa`` attention repeats a grouped-query model's key and value heads to the query heads
(``repeat_kv``) whenever a mask is given on the CPU, and a batch of questions after a shared prefix holds one copy of
the prefix per row, so every decoding step reads ``rows x query_heads`` copies of it. After 7,961 prefix tokens of
SmolLM2-135M (3 key/value heads for 9 query heads), a batch of 8 questions spent 4.5 of its 10.3 CPU seconds in that
copy and 4.6 in the attention kernel reading the copies.

Here (the shared-prefix decomposition of Hydragen, Juravsky et al. 2024, arXiv 2402.05099, section 3): each row's
queries attend to the prefix's keys as one matrix product for all rows and query heads of a key/value head, and to the
row's own tokens (its question, its answer so far) separately; one softmax runs over both parts' scores, so the result
is the same attention up to float rounding. `SharedPrefixLayer` is the cache layer that keeps the prefix once;
`grouped_query_attention()` switches a model's ``sdpa`` layers to `gqa_sdpa_attention` and, for a cache of such
layers, to the shared-prefix computation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

#: the attention implementation's name while `grouped_query_attention()` is in force
GQA_SDPA = "locas_gqa_sdpa"
# what the computation below does not do: left to transformers' own sdpa function
_DELEGATED = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window", "cache")
# scaled_dot_product_attention's enable_gqa came with torch 2.5
_HAS_ENABLE_GQA = torch.__version__ >= "2.5"
# serialises `grouped_query_attention` contexts across threads
_LOCK = threading.RLock()
# the shared-prefix cache the current forward reads, as a `_Sharing` (set by `grouped_query_attention`)
_SHARED_CACHE: ContextVar[Any] = ContextVar("locas_shared_prefix_cache", default=None)


class _Sharing:
    """A shared-prefix ``cache`` in use, and whether the last attention mask shows every row the whole prefix: a
    forward hands every layer the same mask, so it is checked once per forward, not once per layer."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self._mask: torch.Tensor | None = None
        self._seen = True

    def prefix_seen(self, mask: torch.Tensor | None, prefix: int) -> bool:
        if mask is None:
            return True
        if mask is not self._mask:
            self._mask, self._seen = mask, _all_seen(mask[..., :prefix])
        return self._seen


class RoomLayer(DynamicLayer):
    """A cache layer whose rows' new tokens go into a preallocated room (doubled if it runs out) instead of being
    concatenated: ``torch.cat`` copies the whole layer at every step, most of a batched decoding step's time after a
    long prefix. ``keys`` and ``values`` view the filled part. Only what the batched loop uses is kept consistent:
    updates and row selection. Built by `CopiedPrefixLayer` and `SharedPrefixLayer`."""

    def _reserve(self, layer: DynamicLayer, rows: int, length: int) -> None:
        """Room for ``length`` positions of ``rows`` rows, shaped and typed as ``layer``'s keys and values (``(1,
        kv_heads, n, head_dim)``), nothing filled yet."""
        keys, values = layer.keys, layer.values
        self._keys = keys.new_empty((rows, *keys.shape[1:-2], max(length, 1), keys.shape[-1]))
        self._values = values.new_empty((rows, *values.shape[1:-2], max(length, 1), values.shape[-1]))
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._filled(0)

    def _filled(self, length: int) -> None:
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys = torch.cat([self._keys, torch.empty_like(self._keys)], dim=-2)
            self._values = torch.cat([self._values, torch.empty_like(self._values)], dim=-2)
            return self.update(key_states, value_states)
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self._filled(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[-2]
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._filled(length)


class CopiedPrefixLayer(RoomLayer):
    """``rows`` copies of another layer's one-row prefix states, with room for ``room`` more tokens per row: the
    layout any attention implementation reads (every row holds the whole prefix)."""

    def __init__(self, layer: DynamicLayer, rows: int, room: int) -> None:
        super().__init__()
        length = layer.keys.shape[-2]
        self._reserve(layer, rows, length + room)
        self.update(layer.keys.expand(rows, *layer.keys.shape[1:]), layer.values.expand(rows, *layer.values.shape[1:]))


class SharedPrefixLayer(RoomLayer):
    """A cache layer for ``rows`` continuations of one prefix: the prefix's keys and values ``(1, kv_heads,
    prefix_tokens, head_dim)`` are another layer's tensors, shared and never written; each row's own tokens go into
    the room (``room`` positions), so no step concatenates or copies the prefix.

    ``keys`` and ``values`` view the rows' own tokens ``(rows, kv_heads, own_tokens, head_dim)``; `get_seq_length()`
    counts the prefix too. Only `gqa_sdpa_attention` reads such a layer correctly: give it to the model inside
    ``with grouped_query_attention(model, cache):`` and only when `shares_prefix` is true for the model.
    """

    def __init__(self, layer: DynamicLayer, rows: int, room: int) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = layer.keys, layer.values
        self._reserve(layer, rows, room)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.prefix_keys.shape[-2] + self.keys.shape[-2]

    def materialised(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole keys and values ``(rows, kv_heads, prefix_tokens + own_tokens, head_dim)``: the prefix repeated
        to every row, then the rows' ``keys`` / ``values`` (for what `gqa_sdpa_attention` leaves to transformers)."""
        rows = keys.shape[0]
        prefix_keys = self.prefix_keys.expand(rows, *self.prefix_keys.shape[1:])
        prefix_values = self.prefix_values.expand(rows, *self.prefix_values.shape[1:])
        return torch.cat([prefix_keys, keys], dim=-2), torch.cat([prefix_values, values], dim=-2)


def shared_prefix_attention(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Softmax attention of ``query`` ``(rows, heads, q_len, head_dim)`` over a prefix every row sees whole
    (``prefix_keys``/``prefix_values`` ``(1, kv_heads, prefix_tokens, head_dim)``) followed by each row's own
    ``keys``/``values`` ``(rows, kv_heads, own_tokens, head_dim)``, where ``mask`` (boolean, true = seen, or additive;
    ``(rows, 1, q_len, own_tokens)``; ``None``: all seen) covers the rows' own tokens. Query head ``h`` reads key/value
    head ``h // (heads // kv_heads)`` (grouped-query attention). Scores scale by ``scaling`` (default
    ``head_dim ** -0.5``); computed in float32.

    Returns ``(rows, q_len, heads, head_dim)`` in ``query``'s dtype, equal to attention over the concatenated keys up
    to float rounding.
    """
    rows, heads, q_len, dim = query.shape
    kv_heads = prefix_keys.shape[1]
    groups, width = heads // kv_heads, heads // kv_heads * q_len
    scale = dim**-0.5 if scaling is None else scaling
    # (rows, kv_heads, groups * q_len, dim): a key/value head's query heads and positions, group-major
    grouped = query.float().reshape(rows, kv_heads, width, dim) * scale
    # the prefix: one (rows * groups * q_len) x prefix product per key/value head, for every row at once
    stacked = grouped.transpose(0, 1).reshape(kv_heads, rows * width, dim)
    prefix_scores = torch.matmul(stacked, prefix_keys[0].float().transpose(-1, -2))
    own_scores = torch.matmul(grouped, keys.float().transpose(-1, -2))
    if mask is not None:
        mask = mask[:, :, None].expand(rows, 1, groups, q_len, mask.shape[-1]).reshape(rows, 1, width, -1)
        if mask.dtype == torch.bool:
            own_scores = own_scores.masked_fill(~mask, torch.finfo(own_scores.dtype).min)
        else:
            own_scores = own_scores + mask
    # one softmax over both parts, from each part's exponentials against the larger of their maxima (in place on the
    # prefix's scores, the large part: no concatenated or transposed copy of them)
    top = torch.maximum(_rows_layout(prefix_scores.amax(-1, keepdim=True), rows), own_scores.amax(-1, keepdim=True))
    prefix_scores.sub_(top.transpose(0, 1).reshape(kv_heads, rows * width, 1)).exp_()
    own_scores = (own_scores - top).exp_()
    total = _rows_layout(prefix_scores.sum(-1, keepdim=True), rows) + own_scores.sum(-1, keepdim=True)
    output = _rows_layout(torch.matmul(prefix_scores, prefix_values[0].float()), rows)
    output = (output + torch.matmul(own_scores, values.float())) / total
    return output.reshape(rows, heads, q_len, dim).transpose(1, 2).to(query.dtype).contiguous()


def _rows_layout(stacked: torch.Tensor, rows: int) -> torch.Tensor:
    """``(kv_heads, rows * width, n)`` -> ``(rows, kv_heads, width, n)`` (a view)."""
    kv_heads, _, n = stacked.shape
    return stacked.view(kv_heads, rows, -1, n).transpose(0, 1)


def gqa_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' ``sdpa`` attention without repeated key/value heads: ``query`` ``(batch, heads, q_len,
    head_dim)``, ``key``/``value`` ``(batch, kv_heads, kv_len, head_dim)`` (a `SharedPrefixLayer`'s rows' own tokens
    inside `grouped_query_attention()` with its cache), ``attention_mask`` boolean or additive ``(batch, 1, q_len,
    prefix_tokens + kv_len)`` or ``None``; returns ``(batch, q_len, heads, head_dim)`` and no weights.

    With a shared-prefix cache: `shared_prefix_attention` when every row sees the whole prefix (the batched asking's
    layout: pads sit after the prefix); otherwise the prefix is repeated to the rows and this continues as without one.
    Without: ``scaled_dot_product_attention(..., enable_gqa=True)`` where a mask is given on the CPU; the rest (no
    mask: a causal prefill or a decoding step; CUDA, where a mask sends ``enable_gqa`` to the math kernel;
    soft-capping, attention sinks, position biases, sliding windows, paged caches, dropout) goes to ``transformers``'
    own ``sdpa`` function.

    Raises:
        RuntimeError: the shared-prefix layer holds another number of tokens than ``key`` (a model whose attention
            changes the cache's keys before attending; ask it with ``batch_size=1``).
    """
    delegated = dropout != 0.0 or any(kwargs.get(name) is not None for name in _DELEGATED)
    sharing = _SHARED_CACHE.get()
    if sharing is not None:
        layer = sharing.cache.layers[module.layer_idx]
        if layer.keys.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                f"shared-prefix attention: layer {module.layer_idx} holds {layer.keys.shape[-2]} tokens per row but "
                f"attends over {key.shape[-2]}; ask this model with batch_size=1."
            )
        prefix = layer.prefix_keys.shape[-2]
        if sharing.prefix_seen(attention_mask, prefix) and not delegated:
            own = key.shape[-2]
            own_mask = _causal(query, key) if attention_mask is None else attention_mask[..., prefix : prefix + own]
            output = shared_prefix_attention(
                query, layer.prefix_keys, layer.prefix_values, key, value, own_mask, scaling
            )
            return output, None
        key, value = layer.materialised(key, value)
    # on CUDA a mask with enable_gqa falls back to SDPA's math kernel: transformers' own choice is the better one there
    grouped = _HAS_ENABLE_GQA and key.shape[1] != query.shape[1] and query.device.type == "cpu"
    if attention_mask is None or delegated or not grouped:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask[..., : key.shape[-2]], scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def shares_prefix(model: torch.nn.Module) -> bool:
    """Whether `grouped_query_attention()` is in force for ``model`` (then it reads `SharedPrefixLayer` caches): its
    attention is ``transformers``' ``sdpa`` (or already this module's), on torch >= 2.5, not a composite model."""
    config = _text_config(model)
    implementation = getattr(config, "_attn_implementation", None) if config is not None else None
    return _HAS_ENABLE_GQA and implementation in ("sdpa", GQA_SDPA)


@contextmanager
def grouped_query_attention(model: torch.nn.Module, cache: Any = None) -> Iterator[bool]:
    """Inside, ``model``'s attention runs `gqa_sdpa_attention` where it ran ``transformers``' ``sdpa`` (the default
    on the CPU), and reads ``cache``'s `SharedPrefixLayer` layers (when it has them). Yields whether it is in force
    (`shares_prefix`): other implementations (eager, flash, a user's own), composite models and torch < 2.5 are left
    as they are. The implementation is restored on leaving.

    Contexts are serialised across threads (a lock; nesting in one thread is fine), so one thread leaving cannot
    switch the attention back under another's shared-prefix cache; a forward another thread runs meanwhile outside
    such a context computes the same attention through `gqa_sdpa_attention`.

    Raises:
        ValueError: ``cache`` holds shared-prefix layers but the model's attention cannot read them.
    """
    with _LOCK:
        if not shares_prefix(model):
            if _is_shared(cache):
                raise ValueError(
                    "grouped_query_attention: a cache of SharedPrefixLayer needs the model's sdpa attention (torch >= "
                    "2.5); build the cache with CopiedPrefixLayer instead."
                )
            yield False
            return
        config = _text_config(model)
        before = config._attn_implementation
        config._attn_implementation = GQA_SDPA
        shared = _SHARED_CACHE.set(_Sharing(cache) if _is_shared(cache) else None)
        try:
            yield True
        finally:
            _SHARED_CACHE.reset(shared)
            config._attn_implementation = before


def _is_shared(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, SharedPrefixLayer) for layer in layers)


def _causal(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """No mask (transformers' sdpa mask skipped): the last ``q_len`` of the row's own tokens are the queries, each
    sees the earlier ones and itself; a single query sees everything (``None``)."""
    q_len, own = query.shape[2], key.shape[2]
    if q_len == 1:
        return None
    positions = torch.arange(own, device=key.device)
    return (positions[None, :] <= positions[own - q_len :, None])[None, None]


def _all_seen(mask: torch.Tensor) -> bool:
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _text_config(model: torch.nn.Module) -> Any:
    """The config the model's attention layers read (a composite model's sub-configs are left alone: ``None``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return config if config is not None and not getattr(config, "sub_configs", None) else None
