"""Asking a model questions (peft_locas.recall.asking) on tiny models: both prompt forms, cached answers and
log-probabilities equal to uncached ones, batched answers and log-probabilities equal to one-by-one ones, one prefill
of the context, streaming, multi-turn chat, adapters, errors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from tiny_checkpoint import sample_text, stopping_llama
from tiny_checkpoint import tiny_llama as llama
from transformers.cache_utils import DynamicLayer

from peft_locas import LocasConfig
from peft_locas.recall.asking import (
    CONTEXT_INSTRUCTION,
    MEMORY_INSTRUCTION,
    Asker,
    PrefixCache,
    accepts_argument,
    cache_argument,
    end_of_sequence_ids,
    fit_context,
    max_positions,
)
from peft_locas.recall.attention import CopiedPrefixLayer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "Where did the white rabbit run?"
GOLD = "past the garden door"


def conversation(words: int = 300) -> str:
    """A LoCoMo-like context: one ``Speaker: text`` line per turn."""
    sentences = sample_text(words).replace(". ", ".\n").splitlines()
    return "".join(f"{('Alice', 'Bob')[i % 2]}: {s}\n" for i, s in enumerate(sentences))


def greedy_reference(model, prompt_ids: torch.Tensor, limit: int, eos: list[int]) -> list[int]:
    """Greedy decoding by full forwards over the whole sequence, no cache anywhere."""
    ids, new = prompt_ids, []
    with torch.no_grad():
        for _ in range(limit):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token in eos:
                break
    return new


def greedy_margins(model, prompt_ids: torch.Tensor, new: list[int]) -> list[float]:
    """At each greedy step, the chosen token's logit minus the runner-up's (one full forward, no cache)."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, torch.tensor([new])], dim=1), use_cache=False).logits[0]
    top = logits[prompt_ids.shape[1] - 1 : prompt_ids.shape[1] - 1 + len(new)].topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == new
    return (top.values[:, 0] - top.values[:, 1]).tolist()


def decode(tokenizer, ids: list[int], eos: list[int]) -> str:
    ids = ids[:-1] if ids and ids[-1] in eos else ids
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_plain_prompt_form(plain_tokenizer):
    asker = Asker(llama(plain_tokenizer), plain_tokenizer, "Alice: hi\nBob: hello\n", system_prompt="Be brief.")
    assert not asker.use_chat_template
    prompt = asker.prompt("  Who said hi? ")
    head = "Be brief.\n\nAlice: hi\nBob: hello\n\n" + CONTEXT_INSTRUCTION + "\n\nQuestion:"
    assert prompt == head + " Who said hi?\nAnswer:"
    # the question's leading space stays with the question, so it tokenises as in running text
    assert asker.prefix_text == head
    assert asker.prefix_ids.tolist() == plain_tokenizer(head)["input_ids"]
    ids = asker.prompt_ids("Who said hi?")
    assert ids.shape == (1, len(asker.prefix_ids) + len(plain_tokenizer(" Who said hi?\nAnswer:")["input_ids"]))
    assert ids[0, : len(asker.prefix_ids)].tolist() == asker.prefix_ids.tolist()
    from_memory = Asker(llama(plain_tokenizer), plain_tokenizer)
    assert from_memory.prompt("Who said hi?") == MEMORY_INSTRUCTION + "\n\nQuestion: Who said hi?\nAnswer:"


def test_chat_template_prompt_form(plain_tokenizer, chat_tokenizer):
    model = llama(chat_tokenizer)
    asker = Asker(model, chat_tokenizer, "Alice: hi\nBob: hello\n", system_prompt="Be brief.")
    assert asker.use_chat_template
    head = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAlice: hi\nBob: hello\n\n"
        + CONTEXT_INSTRUCTION
        + "\n\nQuestion:"
    )
    assert asker.prompt("Who said hi?") == head + " Who said hi?<|im_end|>\n<|im_start|>assistant\n"
    assert asker.prefix_text == head
    plain = Asker(model, chat_tokenizer, "Alice: hi\n", use_chat_template=False)
    assert plain.prompt("Who?") == "Alice: hi\n\n" + CONTEXT_INSTRUCTION + "\n\nQuestion: Who?\nAnswer:"
    with pytest.raises(ValueError, match=r"^Asker: the tokenizer has no chat template; pass use_chat_template=False"):
        Asker(model, plain_tokenizer, use_chat_template=True)


def test_cached_answers_equal_uncached_greedy_decoding(tokenizer):
    model = llama(tokenizer)
    asker = Asker(model, tokenizer, conversation(), max_new_tokens=12)
    prompt_ids = asker.prompt_ids(QUESTION)
    reference = greedy_reference(model, prompt_ids, 12, asker.eos_token_ids)

    answer = asker.ask(QUESTION)
    assert (answer.question, answer.prompt_tokens, answer.new_tokens) == (QUESTION, prompt_ids.shape[1], len(reference))
    continuation = prompt_ids[0, len(asker.prefix_ids) :]
    with asker._asking():
        generated = asker._generate(continuation, 12, copy.deepcopy(asker._prefilled()))
    assert generated.tolist() == reference  # exactly the same tokens
    pieces = list(asker.stream(QUESTION))
    assert len(pieces) > 1
    assert "".join(pieces) == decode(tokenizer, reference, asker.eos_token_ids)
    assert answer.text == "".join(pieces).strip()
    assert [a.text for a in asker.ask_many([QUESTION, "Who smiled?"])] == [answer.text, asker.ask("Who smiled?").text]
    assert asker.ask(QUESTION, max_new_tokens=3).new_tokens == min(3, len(reference))


def test_cached_logits_and_gold_logprob_equal_a_full_forward(tokenizer):
    model = llama(tokenizer)
    asker = Asker(model, tokenizer, conversation())
    prompt_ids = asker.prompt_ids(QUESTION)
    start = len(asker.prefix_ids)
    with torch.no_grad():
        full = model(input_ids=prompt_ids, use_cache=False).logits[0, start:]
    torch.testing.assert_close(asker._continuation_logits(prompt_ids[0, start:]), full, atol=1e-4, rtol=0)

    logprob, count = asker.answer_logprob(QUESTION, f" {GOLD} ")
    lead = "" if asker.use_chat_template else " "
    gold_ids = tokenizer(lead + GOLD, add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt_ids, torch.tensor([gold_ids])], dim=1)
    with torch.no_grad():
        log_probs = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    expected = sum(log_probs[prompt_ids.shape[1] - 1 + i, t].item() for i, t in enumerate(gold_ids))
    assert count == len(gold_ids)
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert logprob < 0


def test_the_context_is_prefilled_once(tokenizer):
    model = llama(tokenizer)
    asker = Asker(model, tokenizer, conversation(), max_new_tokens=6)
    lengths = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    asker.ask_many([QUESTION, "Who smiled?"])
    asker.answer_logprob(QUESTION, GOLD)
    list(asker.stream("What did the queen say?"))
    chat = asker.chat()
    chat.ask("Who smiled?")
    chat.ask("And then?")
    prefix = len(asker.prefix_ids)
    assert prefix > 300
    assert lengths[0] == prefix
    # every later forward runs a question (with a chat's earlier turns), a gold answer or a token, never the context
    assert max(lengths[1:]) < prefix / 2


QUESTIONS = [
    QUESTION,
    "Who smiled?",
    "What did the queen say to the cat in the long dark hall while alice looked for the key?",
    "Why?",
    "Where is the small golden key?",
    "Did the rabbit run past the door?",
]


def test_batched_answers_equal_one_by_one(tokenizer):
    model = stopping_llama(tokenizer)
    asker = Asker(model, tokenizer, conversation(), max_new_tokens=12)
    one_by_one = [asker.ask(question) for question in QUESTIONS]
    references = [greedy_reference(model, asker.prompt_ids(q), 12, asker.eos_token_ids) for q in QUESTIONS]
    # the fixture is what the test needs: questions of different lengths, answers ending at different steps by an
    # end-of-sequence token or at the limit, and clear greedy choices (rounding, ~1e-7, cannot flip a 1e-4 margin)
    assert len({len(asker.prompt_ids(q)[0]) for q in QUESTIONS}) == len(QUESTIONS)
    stops = [len(ids) for ids in references if ids[-1] in asker.eos_token_ids]
    assert len(set(stops)) >= 2 and any(len(ids) == 12 and ids[-1] not in asker.eos_token_ids for ids in references)
    margins = [greedy_margins(model, asker.prompt_ids(q), ids) for q, ids in zip(QUESTIONS, references, strict=True)]
    assert min(min(m) for m in margins) > 1e-4

    continuations = [asker.prompt_ids(q)[0, len(asker.prefix_ids) :] for q in QUESTIONS]
    with asker._asking():
        assert asker._generate_many(continuations, [12] * len(QUESTIONS), asker._prefilled()) == references
    for batch_size in (1, 4, 16):  # one row, a full and a partial batch, all in one batch
        answers = asker.ask_many(QUESTIONS, batch_size=batch_size)
        assert [a.text for a in answers] == [a.text for a in one_by_one]
        assert [(a.question, a.prompt_tokens, a.new_tokens) for a in answers] == [
            (a.question, a.prompt_tokens, a.new_tokens) for a in one_by_one
        ]
        assert all(a.seconds > 0 for a in answers)
    short = asker.ask_many(QUESTIONS, max_new_tokens=3, batch_size=4)
    assert [a.new_tokens for a in short] == [min(3, len(ids)) for ids in references]
    assert asker.ask_many([]) == []
    # the kept prefix cache is left as it was: one row, the prefix's tokens
    prefilled = asker._prefilled()
    assert prefilled.get_seq_length() == len(asker.prefix_ids)
    assert all(layer.keys.shape[0] == 1 for layer in prefilled.layers)


def test_batched_gold_logprobs_equal_one_by_one(tokenizer):
    asker = Asker(stopping_llama(tokenizer), tokenizer, conversation())
    golds = [GOLD, "the cat", "never find the small golden key under the glass table", "Alice", "a key", "yes"]
    pairs = list(zip(QUESTIONS, golds, strict=True))
    expected = [asker.answer_logprob(question, gold) for question, gold in pairs]
    assert len({count for _, count in expected}) >= 4
    for batch_size in (1, 4, 8):
        scored = asker.answer_logprobs(pairs, batch_size=batch_size)
        assert [count for _, count in scored] == [count for _, count in expected]
        assert [value for value, _ in scored] == pytest.approx([value for value, _ in expected], rel=1e-6, abs=1e-5)
    assert asker.answer_logprobs([]) == []


def test_batches_with_absolute_positions_adapters_and_generation_settings(plain_tokenizer):
    tokenizer = plain_tokenizer
    config = tf.GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=2048, initializer_range=0.2
    )
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(config).eval()  # learned absolute positions: a padded row must get its own
    asker = Asker(gpt2, tokenizer, conversation(), max_new_tokens=8)
    assert [a.text for a in asker.ask_many(QUESTIONS, batch_size=4)] == [asker.ask(q).text for q in QUESTIONS]
    pairs = [(question, GOLD) for question in QUESTIONS]
    expected = [asker.answer_logprob(question, gold)[0] for question, gold in pairs]
    assert [value for value, _ in asker.answer_logprobs(pairs, batch_size=4)] == pytest.approx(expected, abs=1e-5)

    model = get_peft_model(stopping_llama(tokenizer), LocasConfig(r=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".value"):
                parameter.normal_(0, 0.5)
    asker = Asker(model, tokenizer, conversation(120), max_new_tokens=8)
    base = Asker(stopping_llama(tokenizer), tokenizer, conversation(120), max_new_tokens=8)
    with_memory = [a.text for a in asker.ask_many(QUESTIONS, batch_size=3)]
    assert with_memory == [asker.ask(q).text for q in QUESTIONS]
    with model.disable_adapter():
        assert [a.text for a in asker.ask_many(QUESTIONS, batch_size=3)] == [base.ask(q).text for q in QUESTIONS]
    assert with_memory != [base.ask(q).text for q in QUESTIONS]

    # a sliding-window layer would count the pads in its window: such a model is asked one question at a time
    eos = tokenizer.eos_token_id
    config = tf.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=400,
        initializer_range=0.2,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    mistral = tf.MistralForCausalLM(config).eval()
    windowed = Asker(mistral, tokenizer, conversation(), max_new_tokens=4)
    rows = []
    hook = mistral.get_input_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    texts = [a.text for a in windowed.ask_many(QUESTIONS, batch_size=3)]
    gold = [value for value, _ in windowed.answer_logprobs(pairs, batch_size=3)]
    hook.remove()
    assert max(rows) == 1 and texts == [windowed.ask(q).text for q in QUESTIONS]
    assert gold == [windowed.answer_logprob(question, answer)[0] for question, answer in pairs]

    # a generation setting that ``generate`` applies (here: a suppressed token) is honoured: one question at a time
    rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    asker.ask_many(QUESTIONS, batch_size=3)
    assert max(rows) == 3
    model.generation_config.suppress_tokens = [tokenizer(with_memory[0])["input_ids"][0]]
    rows.clear()
    answers = [a.text for a in asker.ask_many(QUESTIONS, batch_size=3)]
    hook.remove()
    assert max(rows) == 1 and answers == [asker.ask(q).text for q in QUESTIONS] and answers != with_memory


def test_continuations_through_the_public_api(tokenizer):
    """`Asker.continuation_ids` are the prompt's ids after the prefix; `Asker.continue_from` decodes after them as
    greedy decoding by full forwards does, with the logits that chose each token, or with the caller's choice of
    tokens and stop; it stops short at the model's last position instead of failing."""
    model = stopping_llama(tokenizer)
    asker = Asker(model, tokenizer, conversation(120), max_new_tokens=12)
    prompt_ids = asker.prompt_ids(QUESTION)
    continuation = asker.continuation_ids(QUESTION)
    assert continuation.dtype == torch.long and continuation.shape == (prompt_ids.shape[1] - len(asker.prefix_ids),)
    assert torch.equal(torch.cat([asker.prefix_ids, continuation]), prompt_ids[0])

    reference = greedy_reference(model, prompt_ids, 12, asker.eos_token_ids)
    ids, logits = asker.continue_from(continuation)
    assert ids == reference and asker.ask(QUESTION).text == decode(tokenizer, ids, asker.eos_token_ids).strip()
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt_ids, torch.tensor([ids])], dim=1), use_cache=False).logits[0]
    start = prompt_ids.shape[1] - 1
    assert logits.shape == (len(ids), len(tokenizer))
    torch.testing.assert_close(logits, full[start : start + len(ids)], atol=1e-4, rtol=0)

    # the caller's tokens (here always 270) and stop (after three): the logits are those over that continuation
    forced = asker.continue_from(continuation, pick=lambda row: 270, stop=lambda new: len(new) == 3)
    assert forced.ids == [270, 270, 270]
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt_ids, torch.tensor([forced.ids])], dim=1), use_cache=False).logits[0]
    torch.testing.assert_close(forced.logits, full[start : start + 3], atol=1e-4, rtol=0)
    assert asker.continue_from(continuation, max_new_tokens=2).ids == reference[:2]

    # near the model's last position: shorter, then nothing (ask() refuses the same prompt)
    tight = Asker(llama(tokenizer, positions=prompt_ids.shape[1] + 2), tokenizer, conversation(120))
    assert len(tight.continue_from(continuation).ids) == 2
    full_up = Asker(llama(tokenizer, positions=prompt_ids.shape[1]), tokenizer, conversation(120))
    assert full_up.continue_from(continuation).ids == [] and full_up.continue_from(continuation).logits.shape == (0, 0)
    with pytest.raises(ValueError, match=r"^Asker: prompt and answer need \d+ positions but the model has \d+; lower"):
        full_up.ask(QUESTION)


def test_asking_after_turns_is_the_chat(tokenizer):
    """`Asker.ask`, `stream`, `prompt` and `continuation_ids` after ``turns`` are what a `Chat` with them uses."""
    asker = Asker(llama(tokenizer), tokenizer, conversation(80), max_new_tokens=6)
    chat = asker.chat()
    first = chat.ask(QUESTION)
    turns = [(QUESTION, first.text)]
    streamed = "".join(chat.stream("Who smiled?"))
    assert "".join(asker.stream("Who smiled?", turns=turns)) == streamed
    assert asker.ask("Who smiled?", turns=turns).text == streamed.strip() == chat.turns[1][1]
    prompt = asker.prompt("Who smiled?", turns=turns)
    if not asker.use_chat_template:
        assert prompt == f"{asker.prompt(QUESTION)} {first.text}\n\nQuestion: Who smiled?\nAnswer:"
    rest = tokenizer(prompt[len(asker.prefix_text) :], add_special_tokens=False)["input_ids"]
    assert asker.continuation_ids("Who smiled?", turns=turns).tolist() == rest
    assert asker.prompt_ids("Who smiled?", turns=turns)[0].tolist() == asker.prefix_ids.tolist() + rest
    malformed = r"^Asker: `turns` must be \(question, answer\) pairs of strings, got \('Who\?',\)\.$"
    with pytest.raises(ValueError, match=malformed):
        asker.ask("Who smiled?", turns=[("Who?",)])


def test_a_prefix_cache_is_prefilled_once_and_decodes_as_full_forwards(plain_tokenizer):
    tokenizer = plain_tokenizer
    model = stopping_llama(tokenizer)
    prefix = torch.tensor(tokenizer(conversation(120))["input_ids"])
    cache = PrefixCache(model, prefix)
    lengths = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: lengths.append(args[0].shape[1])
    )
    eos = end_of_sequence_ids(model, tokenizer)
    questions = [torch.tensor(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in (" Who smiled?", " Why?")]
    decoded = [cache.decode(tokens, 10, eos_token_ids=eos) for tokens in questions]
    hook.remove()
    assert lengths[0] == len(prefix) and max(lengths[1:]) < 10  # one prefill, then only the new tokens
    for tokens, (ids, logits) in zip(questions, decoded, strict=True):
        assert ids == greedy_reference(model, torch.cat([prefix, tokens])[None], 10, eos)
        assert logits.shape == (len(ids), len(tokenizer))
    tokens = questions[0]
    assert cache.prefilled().get_seq_length() == len(prefix)  # the kept cache is never extended
    assert not model.training
    with pytest.raises(
        ValueError, match=r"^PrefixCache\.decode: `max_new_tokens` must be a positive integer, got 0\.$"
    ):
        cache.decode(tokens, 0)
    with pytest.raises(
        ValueError,
        match=r"^PrefixCache\.decode: `tokens` must be a non-empty 1-D tensor of token ids, got shape \(0,\)\.$",
    ):
        cache.decode(torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(
        ValueError,
        match=r"^PrefixCache: `prefix_ids` must be a non-empty 1-D tensor of token ids, got shape \(1, 3\)\.$",
    ):
        PrefixCache(model, torch.tensor([[1, 2, 3]]))


def test_what_a_model_takes(plain_tokenizer):
    llama_model = llama(plain_tokenizer, positions=256)
    peft_model = get_peft_model(llama(plain_tokenizer), LocasConfig(r=8))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=96))
    for model in (llama_model, peft_model, gpt2):
        assert accepts_argument(model, "position_ids") and accepts_argument(model, "attention_mask")
        assert not accepts_argument(model, "no_such_argument")
        assert cache_argument(model) in ("cache", "past_key_values") and accepts_argument(model, cache_argument(model))
    assert accepts_argument(peft_model, "logits_to_keep")  # read from the wrapped class: PeftModel takes **kwargs
    assert [max_positions(m) for m in (llama_model, peft_model, gpt2, torch.nn.Linear(2, 2))] == [256, 2048, 96, None]
    eos = plain_tokenizer.eos_token_id
    assert end_of_sequence_ids(llama_model, plain_tokenizer) == [eos]
    llama_model.generation_config.eos_token_id = [7, eos, 3]
    assert end_of_sequence_ids(llama_model, plain_tokenizer) == sorted({3, 7, eos})


def test_reserved_cache_layer_equals_concatenation():
    torch.manual_seed(0)
    prefix = DynamicLayer()
    prefix.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3))
    reserved, concatenated = CopiedPrefixLayer(prefix, rows=3, room=4), copy.deepcopy(prefix)
    concatenated.batch_repeat_interleave(3)
    for rows, length in [(3, 3), (3, 1), (2, 1), (2, 4)]:  # the room runs out at the second step, then at the last
        if rows < reserved.keys.shape[0]:
            for layer in (reserved, concatenated):
                layer.batch_select_indices(torch.tensor([2, 0]))
        keys, values = torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 3)
        for mine, theirs in zip(reserved.update(keys, values), concatenated.update(keys, values), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert reserved.get_seq_length() == concatenated.get_seq_length() == 14
    assert prefix.keys.shape == (1, 2, 5, 4)  # the kept prefix is untouched


@pytest.mark.parametrize("form", ["plain", "chat"])
def test_chat_follow_up_sees_the_earlier_answer(form, plain_tokenizer, chat_tokenizer):
    tokenizer = plain_tokenizer if form == "plain" else chat_tokenizer
    model = llama(tokenizer)
    context = conversation(80)
    asker = Asker(model, tokenizer, context, max_new_tokens=6)
    chat = asker.chat()
    first = chat.ask(QUESTION)
    second = chat.ask(" Who smiled? ")
    assert first.text == asker.ask(QUESTION).text
    assert chat.messages == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Who smiled?"},
        {"role": "assistant", "content": second.text},
    ]
    user = f"{context.rstrip()}\n\n{CONTEXT_INSTRUCTION}"
    if form == "plain":
        prompt = f"{user}\n\nQuestion: {QUESTION}\nAnswer: {first.text}\n\nQuestion: Who smiled?\nAnswer:"
    else:
        messages = [
            {"role": "user", "content": f"{user}\n\nQuestion: {QUESTION}"},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Question: Who smiled?"},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(asker.prefix_text)
    rest = tokenizer(prompt[len(asker.prefix_text) :], add_special_tokens=False)["input_ids"]
    prompt_ids = torch.cat([asker.prefix_ids, torch.tensor(rest)])[None]
    reference = greedy_reference(model, prompt_ids, 6, asker.eos_token_ids)
    assert (second.prompt_tokens, second.new_tokens) == (prompt_ids.shape[1], len(reference))
    assert second.text == decode(tokenizer, reference, asker.eos_token_ids).strip()
    chat.reset()
    assert chat.turns == [] and chat.ask(QUESTION).text == first.text


def test_adapters_disabled_adapters_and_weight_updates(plain_tokenizer):
    tokenizer, context = plain_tokenizer, conversation(120)
    base = Asker(llama(tokenizer), tokenizer, context, max_new_tokens=8)
    model = get_peft_model(llama(tokenizer), LocasConfig(r=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".value"):
                parameter.normal_(0, 0.5)
    asker = Asker(model, tokenizer, context, max_new_tokens=8)
    with_memory, count = asker.answer_logprob(QUESTION, GOLD)
    without_memory, _ = base.answer_logprob(QUESTION, GOLD)
    assert abs(with_memory - without_memory) > 1e-2
    with model.disable_adapter():
        assert asker.answer_logprob(QUESTION, GOLD) == (pytest.approx(without_memory, abs=1e-5), count)
        assert asker.ask(QUESTION).text == base.ask(QUESTION).text
        assert "".join(asker.stream(QUESTION)) == "".join(base.stream(QUESTION))
    assert asker.answer_logprob(QUESTION, GOLD)[0] == pytest.approx(with_memory, abs=1e-5)
    # weights changed in place (as an optimiser step does): the prefix is prefilled again
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(".value")).mul_(3)
    fresh = Asker(model, tokenizer, context)
    assert asker.answer_logprob(QUESTION, GOLD)[0] == pytest.approx(fresh.answer_logprob(QUESTION, GOLD)[0], abs=1e-5)
    assert asker.answer_logprob(QUESTION, GOLD)[0] != pytest.approx(with_memory, abs=1e-3)


def test_training_mode_is_restored_and_dropout_is_off_while_asking(plain_tokenizer):
    config = tf.GPT2Config(vocab_size=len(plain_tokenizer), n_embd=64, n_layer=2, n_head=4, n_inner=128)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config).eval()  # dropout 0.1 everywhere: training mode would change every answer
    reference = Asker(model, plain_tokenizer, conversation(80), max_new_tokens=8)
    expected_text, expected_logprob = reference.ask(QUESTION).text, reference.answer_logprob(QUESTION, GOLD)
    model.train()
    asker = Asker(model, plain_tokenizer, conversation(80), max_new_tokens=8)
    assert asker.ask(QUESTION).text == expected_text
    assert model.training
    assert asker.answer_logprob(QUESTION, GOLD) == expected_logprob
    assert "".join(asker.stream(QUESTION)).strip() == expected_text
    assert model.training and all(m.training for m in model.modules())
    threads = threading.active_count()
    pieces = asker.stream(QUESTION)
    assert next(pieces) and not model.training  # eval while the answer streams
    pieces.close()  # stops generation early: its thread has ended and training mode is back
    assert threading.active_count() == threads and model.training


def test_errors_are_one_clear_line(plain_tokenizer):
    model = llama(plain_tokenizer, positions=256)
    asker = Asker(model, plain_tokenizer, "Alice: hi\n")
    empty = r"^Asker: the question is empty; pass a non-empty question\.$"
    for call in (asker.ask, asker.stream, asker.prompt, lambda q: asker.answer_logprob(q, GOLD)):
        with pytest.raises(ValueError, match=empty):
            call("  ")
    with pytest.raises(ValueError, match=r"^Asker\.answer_logprob: the answer is empty; pass the gold answer text\.$"):
        asker.answer_logprob(QUESTION, " ")
    with pytest.raises(ValueError, match=r"^Asker\.answer_logprobs: the answer is empty; pass the gold answer text\.$"):
        asker.answer_logprobs([(QUESTION, GOLD), (QUESTION, "")])
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"^Asker: `batch_size` must be a positive integer, got {bad!r}\.$"):
            asker.ask_many([QUESTION], batch_size=bad)
        with pytest.raises(ValueError, match=rf"^Asker: `batch_size` must be a positive integer, got {bad!r}\.$"):
            asker.answer_logprobs([(QUESTION, GOLD)], batch_size=bad)
    forwards = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: forwards.append(args))
    with pytest.raises(ValueError, match=empty):  # every question is checked before any is answered
        asker.ask_many([QUESTION, " "])
    with pytest.raises(ValueError, match=r"^Asker: prompt and answer need \d+ positions but the model has 256; lower"):
        asker.ask_many([QUESTION, "Who?"], max_new_tokens=250)
    assert forwards == []
    with pytest.raises(ValueError, match=r"^Asker: `max_new_tokens` must be a positive integer, got 0\.$"):
        asker.ask(QUESTION, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^Asker: prompt and answer need \d+ positions but the model has 256; lower"):
        asker.ask(QUESTION, max_new_tokens=250)
    context = conversation()
    with pytest.raises(
        ValueError,
        match=r"^Asker: the prompt prefix has \d+ tokens but the model has 256 positions; pass max_context_tokens to ",
    ):
        Asker(model, plain_tokenizer, context)
    fitted = Asker(model, plain_tokenizer, context, max_context_tokens=40, max_new_tokens=8)
    assert fitted.context == fit_context(plain_tokenizer, context, 40)
    assert fitted.ask(QUESTION).new_tokens <= 8


def test_fit_context_keeps_the_end_from_a_line_start(plain_tokenizer):
    tokenizer = plain_tokenizer
    text = conversation()
    assert fit_context(tokenizer, text, 10_000) == text
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for budget in (20, 100, 300):
        raw = text[encoded["offset_mapping"][-budget][0] :]
        newline = raw.find("\n", 0, len(raw) // 10)
        kept = fit_context(tokenizer, text, budget)
        assert text.endswith(kept) and len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= budget
        assert kept == (raw[newline + 1 :] if newline >= 0 else raw)
    kept = fit_context(tokenizer, text, 300)
    assert text[len(text) - len(kept) - 1] == "\n" and kept.startswith(("Alice: ", "Bob: "))
    one_line = text.replace("\n", " ")
    kept = fit_context(tokenizer, one_line, 50)
    assert one_line.endswith(kept) and len(tokenizer(kept, add_special_tokens=False)["input_ids"]) in (49, 50)
    with pytest.raises(ValueError, match=r"^fit_context: `max_tokens` must be a positive integer, got 0\.$"):
        fit_context(tokenizer, text, 0)
