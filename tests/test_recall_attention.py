"""Attention for batched continuations of one prefix (peft_locas.recall.attention): the shared-prefix computation and
the grouped-query path equal transformers' sdpa attention over the whole keys; batched asking keeps the prefix once,
and the model's attention implementation is switched back afterwards."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf
from tiny_checkpoint import stopping_llama
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peft_locas.recall import attention
from peft_locas.recall.asking import Asker

pytestmark = pytest.mark.usefixtures("one_thread")
MIN = torch.finfo(torch.float32).min


class Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True
    layer_idx = 0


def masks(rows: int, q_len: int, length: int) -> torch.Tensor:
    """Boolean masks ``(rows, 1, q_len, length)``: causal for the last ``q_len`` positions, row 1 with 4 pads after
    a 30-token prefix."""
    seen = torch.ones(rows, 1, q_len, length, dtype=torch.bool).tril(length - q_len)
    seen[1, ..., 30:34] = False
    return seen


def shared_cache(prefix_keys, prefix_values, rows):
    layer = DynamicLayer()
    layer.update(prefix_keys, prefix_values)
    cache = tf.DynamicCache()
    cache.layers = [attention.SharedPrefixLayer(layer, rows, room=2)]
    return cache


@pytest.mark.parametrize("q_len", [1, 6])
@pytest.mark.parametrize("boolean", [True, False])
def test_equal_to_transformers_sdpa_over_the_whole_keys(q_len, boolean):
    torch.manual_seed(0)
    rows, prefix, own = 4, 30, 10
    query = torch.randn(rows, 6, q_len, 16)
    prefix_keys, prefix_values = torch.randn(1, 2, prefix, 16), torch.randn(1, 2, prefix, 16)
    own_keys, own_values = torch.randn(rows, 2, own, 16), torch.randn(rows, 2, own, 16)
    keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), own_keys], dim=-2)
    values = torch.cat([prefix_values.expand(rows, -1, -1, -1), own_values], dim=-2)
    seen = masks(rows, q_len, prefix + own)
    mask = seen if boolean else torch.zeros(seen.shape).masked_fill(~seen, MIN)
    expected, _ = sdpa_attention_forward(Attention(), query, keys, values, mask, scaling=0.25)

    # grouped-query sdpa over the whole keys (no shared cache)
    grouped, weights = attention.gqa_sdpa_attention(Attention(), query, keys, values, mask, scaling=0.25)
    assert weights is None and grouped.shape == (rows, q_len, 6, 16)
    torch.testing.assert_close(grouped, expected, atol=1e-6, rtol=1e-5)

    # the prefix once, each row's own tokens apart: through a shared-prefix cache as a model's layer reads it
    cache = shared_cache(prefix_keys, prefix_values, rows)
    own_keys_seen, own_values_seen = cache.layers[0].update(own_keys, own_values)
    assert cache.layers[0].get_seq_length() == prefix + own and cache.layers[0].prefix_keys.shape[0] == 1
    token = attention._SHARED_CACHE.set(attention._Sharing(cache))
    try:
        shared, _ = attention.gqa_sdpa_attention(Attention(), query, own_keys_seen, own_values_seen, mask, scaling=0.25)
        # a row that does not see the whole prefix: the prefix is repeated to the rows, same result
        hidden = mask.clone()
        hidden[2, ..., 3] = False if boolean else MIN
        partial, _ = attention.gqa_sdpa_attention(Attention(), query, own_keys_seen, own_values_seen, hidden, 0.0, 0.25)
        with pytest.raises(
            RuntimeError, match=r"^shared-prefix attention: layer 0 holds 10 tokens per row but attends"
        ):
            attention.gqa_sdpa_attention(Attention(), query, own_keys[..., :4, :], own_values, mask, scaling=0.25)
    finally:
        attention._SHARED_CACHE.reset(token)
    torch.testing.assert_close(shared, expected, atol=1e-6, rtol=1e-5)
    reference, _ = sdpa_attention_forward(Attention(), query, keys, values, hidden, scaling=0.25)
    torch.testing.assert_close(partial, reference, atol=1e-6, rtol=1e-5)


def test_no_mask_is_causal_over_the_rows_own_tokens():
    torch.manual_seed(1)
    query, prefix_keys, prefix_values = torch.randn(2, 6, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    own_keys, own_values = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    keys = torch.cat([prefix_keys.expand(2, -1, -1, -1), own_keys], dim=-2)
    values = torch.cat([prefix_values.expand(2, -1, -1, -1), own_values], dim=-2)
    expected, _ = sdpa_attention_forward(Attention(), query, keys, values, masks(2, 5, 12).fill_(True).tril(7))
    cache = shared_cache(prefix_keys, prefix_values, 2)
    cache.layers[0].update(own_keys, own_values)
    token = attention._SHARED_CACHE.set(attention._Sharing(cache))
    try:
        shared, _ = attention.gqa_sdpa_attention(Attention(), query, own_keys, own_values, None)
    finally:
        attention._SHARED_CACHE.reset(token)
    torch.testing.assert_close(shared, expected, atol=1e-6, rtol=1e-5)


def test_batched_asking_keeps_the_prefix_once_and_restores_the_implementation(tokenizer, monkeypatch):
    model = stopping_llama(tokenizer)
    assert model.config._attn_implementation == "sdpa" and attention.shares_prefix(model)
    seen = []
    real = attention.gqa_sdpa_attention

    def spy(module, query, key, *args, **kwargs):
        sharing = attention._SHARED_CACHE.get()
        shared = sharing is not None and all(x.prefix_keys.shape[0] == 1 for x in sharing.cache.layers)
        seen.append((query.shape[0], shared))
        return real(module, query, key, *args, **kwargs)

    checks = []
    all_seen = attention._all_seen
    monkeypatch.setattr(attention, "_all_seen", lambda mask: checks.append(mask.shape) or all_seen(mask))
    tf.AttentionInterface.register(attention.GQA_SDPA, spy)
    try:
        asker = Asker(model, tokenizer, "Alice followed the white rabbit down the hole. " * 20, max_new_tokens=3)
        asker.ask_many(["Who ran?", "Where did Alice go?"], batch_size=2)
        asker.answer_logprobs([("Who ran?", "the rabbit"), ("Where?", "down")], batch_size=2)
    finally:
        tf.AttentionInterface.register(attention.GQA_SDPA, real)
    assert seen and all(rows == 2 and shared for rows, shared in seen)
    # the prefix's visibility is checked once per forward (every layer gets the same mask), not once per layer
    assert 0 < len(checks) <= len(seen) // model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa" and attention._SHARED_CACHE.get() is None

    # an error inside restores it too; another implementation is left alone and gets no shared-prefix cache
    with pytest.raises(RuntimeError), attention.grouped_query_attention(model) as in_force:
        assert in_force and model.config._attn_implementation == attention.GQA_SDPA
        raise RuntimeError
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    assert not attention.shares_prefix(model)
    with attention.grouped_query_attention(model) as in_force:
        assert not in_force and model.config._attn_implementation == "eager"
    eager = Asker(model, tokenizer, "Alice followed the white rabbit down the hole. " * 20, max_new_tokens=3)
    texts = [a.text for a in eager.ask_many(["Who ran?", "Where did Alice go?"], batch_size=2)]
    assert texts == [eager.ask(q).text for q in ["Who ran?", "Where did Alice go?"]]


def test_contexts_nest_and_are_serialised_across_threads(tokenizer):
    model = stopping_llama(tokenizer)
    prefix = DynamicLayer()
    prefix.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    cache = tf.DynamicCache()
    cache.layers = [attention.SharedPrefixLayer(prefix, rows=2, room=4)]
    # nested in one thread: the inner context registers its cache and leaves the outer one's implementation in force
    with attention.grouped_query_attention(model) as outer:
        with attention.grouped_query_attention(model, cache) as inner:
            assert outer and inner and attention._SHARED_CACHE.get().cache is cache
        assert model.config._attn_implementation == attention.GQA_SDPA and attention._SHARED_CACHE.get() is None
    assert model.config._attn_implementation == "sdpa"

    # another thread waits until the first one leaves, so it never sees the implementation switched back under it
    inside, release, order = threading.Event(), threading.Event(), []

    def first():
        with attention.grouped_query_attention(model, cache):
            inside.set()
            release.wait(10)
            order.append("first leaves")

    def second():
        with attention.grouped_query_attention(model):
            order.append(f"second enters with {model.config._attn_implementation}")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inside.wait(10)
    threads[1].start()
    threads[1].join(0.5)
    assert threads[1].is_alive() and order == []
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["first leaves", f"second enters with {attention.GQA_SDPA}"]
    assert model.config._attn_implementation == "sdpa"

    # a shared-prefix cache the model's attention cannot read is refused, not read wrongly
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"^grouped_query_attention: a cache of SharedPrefixLayer needs the model's"):
        with attention.grouped_query_attention(model, cache):
            pass
