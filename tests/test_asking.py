"""Asking a model questions (peft_locas.recall.asking) on tiny models: both prompt forms, cached answers and
log-probabilities equal to uncached ones, one prefill of the context, streaming, multi-turn chat, adapters, errors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from tiny_checkpoint import sample_text, tiny_tokenizer

from peft_locas import LocasConfig
from peft_locas.recall.asking import CONTEXT_INSTRUCTION, MEMORY_INSTRUCTION, Asker, fit_context

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = "Where did the white rabbit run?"
GOLD = "past the garden door"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(params=["plain", "chat"])
def tokenizer(request, plain_tokenizer, chat_tokenizer):
    return plain_tokenizer if request.param == "plain" else chat_tokenizer


def conversation(words: int = 300) -> str:
    """A LoCoMo-like context: one ``Speaker: text`` line per turn."""
    sentences = sample_text(words).replace(". ", ".\n").splitlines()
    return "".join(f"{('Alice', 'Bob')[i % 2]}: {s}\n" for i, s in enumerate(sentences))


def llama(tokenizer, seed: int = 0, positions: int = 2048) -> tf.LlamaForCausalLM:
    eos = tokenizer.eos_token_id
    config = tf.LlamaConfig(
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
