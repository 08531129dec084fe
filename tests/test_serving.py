"""Serving many memories: `ask_memories` answers each question with the memory it names, several memories per batch,
exactly as `Asker.ask` does with that memory alone."""

import pytest
import torch
from peft import get_peft_model
from tiny_checkpoint import sample_text, stopping_llama, tiny_tokenizer

from peft_locas import LocasConfig
from peft_locas.recall.asking import Asker
from peft_locas.recall.serving import BASE, ask_memories

QUESTIONS = ["Where did the white rabbit run?", "Who smiled?", "What did the queen say about the small golden key?"]


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = get_peft_model(stopping_llama(tokenizer), LocasConfig(r=8, init_weights=False), adapter_name="book")
    model.add_adapter("diary", LocasConfig(r=4, init_weights=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # memories strong enough to change the answers
        for name, parameter in model.named_parameters():
            if "locas_memory" in name and "value" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer


@pytest.mark.parametrize("context", [None, "Alice: the key is under the table.\nBob: the cat smiled.\n"])
def test_each_row_is_answered_by_its_memory(served, context):
    model, tokenizer = served
    requests = [(name, q) for q in QUESTIONS for name in ("book", "diary", BASE)]
    answers = ask_memories(Asker(model, tokenizer, context, max_new_tokens=12), requests, batch_size=4)
    expected = {}
    for name in ("book", "diary", BASE):
        asker = Asker(model, tokenizer, context, max_new_tokens=12)
        if name == BASE:
            with model.disable_adapter():
                expected[name] = [asker.ask(q) for q in QUESTIONS]
        else:
            model.set_adapter(name)
            expected[name] = [asker.ask(q) for q in QUESTIONS]
    model.set_adapter("book")
    for (name, question), answer in zip(requests, answers, strict=True):
        reference = expected[name][QUESTIONS.index(question)]
        assert (answer.question, answer.text, answer.new_tokens, answer.prompt_tokens) == (
            reference.question,
            reference.text,
            reference.new_tokens,
            reference.prompt_tokens,
        )
    texts = {name: [a.text for a in expected[name]] for name in expected}
    assert texts["book"] != texts["diary"] != texts[BASE]  # the memories really answer differently


def test_misuse(served):
    model, tokenizer = served
    asker = Asker(model, tokenizer, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"the model holds no adapter 'novel'"):
        ask_memories(asker, [("book", "Who?"), ("novel", "Who?")])
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        ask_memories(asker, [("book", "Who?")], batch_size=0)
    long = Asker(model, tokenizer, sample_text(300), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"exceed the model's 2048 positions"):
        ask_memories(long, [("book", "Who?")], max_new_tokens=2000)
