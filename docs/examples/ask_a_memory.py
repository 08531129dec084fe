"""Memorise a conversation into a Locas memory, then ask the memorised model questions: turn-aligned chunks, a context
prefilled once, gold log-probabilities, multi-turn chat, LoCoMo's F1, and the self-distillation objective."""

# --8<-- [start:conversation]
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import Asker, LocasConfig, MemorizeConfig, load_conversation, memorize, render_conversation
from peft_locas.chunking import chunk_windows, text_and_boundaries
from peft_locas.recall.dialogue import turn_spans
from peft_locas.recall.metrics import CATEGORIES, locomo_f1

from _tiny import tiny_model_dir  # docs helper: a tiny offline model folder

turns = [  # the turns JSONL form: one JSON object per turn; a LoCoMo .json file works the same way
    {"speaker": "Ann", "text": "I moved to Lyon last week.", "session": 1, "date_time": "8 May 2023, 1:56 pm"},
    {"speaker": "Bob", "text": "Lyon! What took you there?"},
    {"speaker": "Ann", "text": "A job at the silk museum. I restore old looms."},
    {"speaker": "Bob", "text": "My sister Clara lives there, she teaches the cello."},
    {"speaker": "Ann", "text": "I should meet her. Does she like cycling?"},
    {"speaker": "Bob", "text": "She rides to the Croix-Rousse market every Saturday."},
    {"speaker": "Ann", "text": "The new flat is rainy but I love it.", "session": 2, "date_time": "20 May 2023"},
    {"speaker": "Bob", "text": "Did you meet Clara?", "id": "bob-clara"},
    {"speaker": "Ann", "text": "Yes, at the market. She gave me a lemon tart.", "caption": "a photo of a tart"},
    {"speaker": "Bob", "text": "Typical Clara. Her tarts won a prize in 2019."},
    {"speaker": "Ann", "text": "Next week I start on a loom from 1804, the oldest in the museum."},
    {"speaker": "Bob", "text": "Send me a picture when it weaves again!"},
    {"speaker": "Ann", "text": "I will. We named our cat Jacquard, after the loom's inventor.", "session": 3},
    {"speaker": "Bob", "text": "Ha! Does Jacquard like the rain?"},
    {"speaker": "Ann", "text": "He hates it. He sleeps on the warm loom bench all day."},
]
Path("dialogue.jsonl").write_text("".join(json.dumps(turn) + "\n" for turn in turns), encoding="utf-8")

conversation = load_conversation("dialogue.jsonl")  # or load_conversation("locomo10.json", sample="conv-26")
text = render_conversation(conversation)  # the exact text that is memorised, and shown as context
print(text[:160])
# [Session 1 - 8 May 2023, 1:56 pm]
# Ann: I moved to Lyon last week.
# Bob: Lyon! What took you there?
# ...
spans = turn_spans(conversation)  # the character span of every header and turn line: where chunks may begin
assert text[spans[0].start : spans[0].end] == "[Session 1 - 8 May 2023, 1:56 pm]" and spans[0].dia_id is None
assert text[spans[1].start : spans[1].end] == "Ann: I moved to Lyon last week." and spans[1].dia_id == "D1:1"
# --8<-- [end:conversation]
assert [span.dia_id for span in spans if span.dia_id and not span.dia_id.startswith("D")] == ["bob-clara"]
assert "[shares a photo: a photo of a tart]" in text

# --8<-- [start:memorize]
model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)

# a Conversation (not its text): chunks then begin only where a session header or a turn begins
config = MemorizeConfig(chunk_tokens=256, context_tokens=64, compare_baseline=True)
result = memorize(model, tokenizer, conversation, config, peft_config=LocasConfig(r=16))
print(f"prequential perplexity {result.perplexity:.2f} (without memory {result.baseline_perplexity:.2f})")
result.model.save_pretrained("dialogue-memory")
# --8<-- [end:memorize]

# --8<-- [start:chunks]
ids, unit_starts = text_and_boundaries(tokenizer, conversation)  # token ids, and the token where each line starts
windows = chunk_windows(len(ids), chunk_tokens=256, context_tokens=64, boundaries=unit_starts)
# ids[window.start:window.first] is a window's attention prefix (no loss), ids[window.first:window.end] its scored
# tokens; a chunk begins where the previous one ended (the text's very first token is never scored: nothing predicts it)
for begin, window in zip([0] + [w.end for w in windows[:-1]], windows, strict=True):
    first_line = tokenizer.decode(ids[begin : window.end]).split("\n")[0]
    print(f"chunk of {window.scored} scored tokens, starting at {first_line!r}")
# --8<-- [end:chunks]
assert len(windows) == len(result.token_counts) and [w.scored for w in windows] == result.token_counts
assert all(window.first in unit_starts for window in windows[1:]) and windows[0].first == 1

# --8<-- [start:ask]
model = result.model  # or PeftModel.from_pretrained(base, "dialogue-memory"), or a merged checkpoint

# from memory alone: no context in the prompt, the question must be answered by what the memory holds
asker = Asker(model, tokenizer, max_new_tokens=16)
answer = asker.ask("What is the name of Ann's cat?")
print(answer.text, answer.prompt_tokens, answer.new_tokens, f"{answer.seconds:.2f} s")

# with recent context: its tokens are run through the model once, and every question reuses that KV cache
recent = Asker(model, tokenizer, context=text, max_context_tokens=200, max_new_tokens=16)  # the last 200 tokens
for answer in recent.ask_many(["Where does Clara shop on Saturdays?", "Who won a prize in 2019?"]):
    print(f"{answer.question} -> {answer.text}")

# the summed log-probability (natural log) of a gold answer, and its token count: a score that needs no generation
logprob, tokens = asker.answer_logprob("What is the name of Ann's cat?", "Jacquard")
with model.disable_adapter():  # the same question to the model without its memory (its own prefilled cache)
    base_logprob, _ = asker.answer_logprob("What is the name of Ann's cat?", "Jacquard")
print(f"log p(gold) with memory {logprob:.2f}, without {base_logprob:.2f} ({tokens} tokens)")
# --8<-- [end:ask]
assert answer.new_tokens <= 16 and tokens == len(tokenizer(" Jacquard", add_special_tokens=False).input_ids)
assert recent.context == text[-len(recent.context) :] and logprob != base_logprob

# --8<-- [start:chat]
chat = asker.chat()  # follow-ups see the earlier questions and answers; the shared prefix stays prefilled
for piece in chat.stream("Which museum does Ann work at?"):  # pieces as they are decoded
    print(piece, end="", flush=True)
print()
follow_up = chat.ask("And what does she do there?")
print(chat.messages)  # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
# --8<-- [end:chat]
assert len(chat.turns) == 2 and chat.turns[1] == ("And what does she do there?", follow_up.text)

# --8<-- [start:score]
# LoCoMo's official token F1 (stemmed bag of words); category 1 splits on commas, 5 wants "not mentioned"
print(locomo_f1("a cat called Jacquard", "Jacquard", category=4))  # 0.5: one shared stem of two / of one
print(locomo_f1("Not mentioned in the conversation.", None, category=5), CATEGORIES[5])  # 1.0 adversarial
# --8<-- [end:score]
assert locomo_f1("a cat called Jacquard", "Jacquard", category=4) == 0.5

# --8<-- [start:distill]
# self-distillation: the model *without* the memory reads a long window (the teacher), the model *with* the memory
# reads the short one (the student); the memory learns to make up for the context the student cannot see
distill = MemorizeConfig(
    chunk_tokens=256,
    context_tokens=64,
    objective="distill",
    teacher_context_tokens=768,  # the teacher's window, chunk included (default: all the model's positions)
    distill_top_k=64,  # KL over the teacher's 64 most probable tokens plus "any other token" (None: full vocabulary)
    ntp_weight=0.0,  # add this much next-token loss to the KL
)
base = AutoModelForCausalLM.from_pretrained(model_dir)
distilled = memorize(base, tokenizer, conversation, distill, peft_config=LocasConfig(r=16))
print(f"distilled memory: prequential perplexity {distilled.perplexity:.2f}")  # scored as the NTP run is
# --8<-- [end:distill]
assert distilled.token_counts == result.token_counts and len(distilled.train_losses) == len(windows)
