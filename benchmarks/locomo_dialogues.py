"""LoCoMo conversations as `locomo.py` asks about them: a conversation with its rendered text, token ids and turn
units (`Dialogue`); the first sessions of one for quick mode; questions drawn per category; the window a setting shows
(`View`: none, the last N tokens from a turn start with its session's header); questions worded as LoCoMo's QA code
words them (``task_eval/gpt_utils.py``), and adversarial answers read back as LoCoMo reads them.
No model here: only a tokenizer's counts."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any

from peft_locas.engine.chunking import text_and_boundaries
from peft_locas.recall.dialogue import Conversation, Question, TurnSpan, render_conversation, turn_spans

#: the log-likelihood's gold for adversarial questions: LoCoMo's own option text for "the conversation does not say"
ADVERSARIAL_GOLD = "Not mentioned in the conversation."
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."


@dataclasses.dataclass
class Dialogue:
    """One conversation as the benchmark uses it: the (possibly truncated) conversation, its rendered text, token ids
    and unit starts (`text_and_boundaries`), and the questions asked, as ``(index in its qa list, question)``."""

    sample_id: str
    dataset: str
    source: str
    conversation: Conversation
    sessions_total: int
    questions: list[tuple[int, Question]]
    text: str
    ids: list[int]
    starts: list[int]
    spans: list[TurnSpan]
    dia_units: dict[str, int]
    header_of: list[int | None]

    @classmethod
    def build(
        cls, sample_id: str, dataset: str, source: str, conversation: Conversation, sessions_total: int, tokenizer
    ) -> Dialogue:
        spans = turn_spans(conversation)
        ids, starts = text_and_boundaries(tokenizer, conversation)
        header, header_of, dia_units = None, [], {}
        for unit, span in enumerate(spans):
            if span.dia_id is None:
                header = unit
                header_of.append(None)
            else:
                header_of.append(header)
                dia_units[span.dia_id] = unit
        return cls(
            sample_id,
            dataset,
            source,
            conversation,
            sessions_total,
            [],
            render_conversation(conversation),
            ids,
            starts,
            spans,
            dia_units,
            header_of,
        )

    @property
    def text_sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def unit_end(self, unit: int) -> int:
        """The token index where ``unit`` ends (the next unit's start, or the end of the text)."""
        return self.starts[unit + 1] if unit + 1 < len(self.starts) else len(self.ids)

    def evidence_units(self, question: Question) -> list[int] | None:
        """The units of the question's evidence turns; ``None`` when it has none or names a turn not in the text."""
        if not question.evidence or any(dia_id not in self.dia_units for dia_id in question.evidence):
            return None
        return [self.dia_units[dia_id] for dia_id in question.evidence]


def first_sessions(conversation: Conversation, max_tokens: int, count) -> Conversation:
    """The conversation cut to its first sessions whose rendered text holds at most ``max_tokens`` tokens (at least
    one session), for quick mode."""
    kept = 1
    while kept < len(conversation.sessions):
        candidate = dataclasses.replace(conversation, sessions=conversation.sessions[: kept + 1])
        if count(render_conversation(candidate)) > max_tokens:
            break
        kept += 1
    return dataclasses.replace(conversation, sessions=conversation.sessions[:kept])


def stratified(questions: list[tuple[int, Question]], count: int, seed: int) -> list[tuple[int, Question]]:
    """``count`` questions drawn with ``seed`` as evenly over categories as they allow (a category with fewer
    questions gives all of them and leaves its share to the others), returned in their original order."""
    by_category: dict[Any, list[tuple[int, Question]]] = {}
    for item in questions:
        by_category.setdefault(item[1].category, []).append(item)
    rng = random.Random(seed)
    pools = {category: rng.sample(items, len(items)) for category, items in sorted(by_category.items(), key=str)}
    chosen: list[tuple[int, Question]] = []
    while len(chosen) < min(count, len(questions)):
        for pool in pools.values():
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return sorted(chosen, key=lambda item: item[0])


def answerable(question: Question) -> bool:
    """Scorable: an adversarial question, or one with a gold answer (LoCoMo has a few without)."""
    return question.category == 5 or bool(question.answer and str(question.answer).strip())


@dataclasses.dataclass(frozen=True)
class View:
    """What a setting shows of the dialogue: nothing (``unit`` None), or the text from ``unit`` on, after the header
    of the session that unit is in; ``start_token`` is that unit's first token in the whole text."""

    window: str
    unit: int | None
    context: str | None
    start_token: int | None
    tokens: int

    def outside(self, dialogue: Dialogue, question: Question) -> bool | None:
        """Whether every evidence turn lies before the window (with no window: always); ``None`` when the question
        has no usable evidence (left out of the outside-window split)."""
        units = dialogue.evidence_units(question)
        if units is None:
            return None
        return self.unit is None or all(dialogue.unit_end(unit) <= self.start_token for unit in units)


def view(dialogue: Dialogue, window: str, budget: int | None, count) -> View:
    """The longest tail of the dialogue that starts at a unit and fits ``budget`` tokens together with the header of
    the session it starts in (the last unit alone when not even that fits); no dialogue for ``"none"``."""
    if window == "none":
        return View(window, None, None, None, 0)
    total, last = len(dialogue.ids), len(dialogue.starts) - 1
    for unit, start in enumerate(dialogue.starts):
        if total - start > budget and unit < last:
            continue
        header = dialogue.header_of[unit]
        prefix = "" if header is None else dialogue.text[dialogue.spans[header].start : dialogue.spans[header].end]
        prefix += "\n" if prefix else ""
        tokens = total - start + (count(prefix) if prefix else 0)
        if tokens <= budget or unit == last:
            return View(window, unit, prefix + dialogue.text[dialogue.spans[unit].start :], start, tokens)
    raise AssertionError("unreachable: the last unit is always returned")


def question_prompt(question: Question, index: int, seed: int) -> tuple[str, dict[str, str] | None]:
    """The question as LoCoMo's QA code asks it (``task_eval/gpt_utils.py``), and the adversarial options.

    Temporal (2): the date hint appended. Adversarial (5): "Select the correct answer: (a) .. (b) .." with "Not
    mentioned in the conversation" and the tempting wrong answer in an order seeded by ``(seed, index)``."""
    text = question.question.strip()
    if question.category == 2:
        return text + TEMPORAL_HINT, None
    wrong = question.extra.get("adversarial_answer", question.answer)
    if question.category != 5 or wrong is None:
        return text, None
    options = [ADVERSARIAL_GOLD.rstrip("."), str(wrong)]
    if random.Random(f"{seed}:{index}").random() < 0.5:
        options.reverse()
    return f"{text} Select the correct answer: (a) {options[0]} (b) {options[1]}.", {"a": options[0], "b": options[1]}


def adversarial_prediction(answer: str, options: dict[str, str]) -> str:
    """LoCoMo's ``get_cat_5_answer``: a bare "a"/"b" or "(a)"/"(b)" becomes that option's text; else the answer."""
    text = answer.strip().lower()
    if len(text) == 1:
        return options["a"] if "a" in text else options["b"]
    if len(text) == 3:
        return options["a"] if "(a)" in text else options["b"]
    return answer
