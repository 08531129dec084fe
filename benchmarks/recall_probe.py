"""A recall probe: a generated conversation full of invented facts that no model can know, in LoCoMo's JSON layout,
and a question about every fact, to be asked without the conversation in the prompt.

Two speakers with invented names talk over several dated sessions. Most turns are small talk; every so often one of
them states a fact about themselves built from invented material: the name of a pet, a relative, a boat or a band
(made-up words such as "Brelvan"), the town they grew up in ("Thornaby"-like compounds of made-up stems), the company
they now work for, a number (a bus line, an age, a floor) or a date. The other speaker then reacts without repeating
it. Facts are spread evenly over the conversation, so some lie far behind any short window. Each fact gets one
question (LoCoMo category 4, single-hop, with the fact's turn as its evidence), phrased either like the fact's
sentence or differently ("Which town is Ann originally from?" for "I grew up in ..."); its gold answer appears
verbatim in the evidence turn.

The output is one LoCoMo sample (a list holding one object with ``sample_id``, ``conversation`` with ``speaker_a``,
``speaker_b``, ``session_N`` and ``session_N_date_time``, and ``qa``), so `benchmarks/locomo.py --data` and
`peft_locas.recall.dialogue.load_conversation` read it like ``locomo10.json``. The same seed and sizes give the same
file, byte for byte.

    python benchmarks/recall_probe.py --facts 40 --tokens 12000 --seed 0 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

#: characters per token assumed when no tokenizer counts them (SmolLM2 reads LoCoMo's dialogue at 3.8-4.1)
CHARS_PER_TOKEN = 4

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr", "v")
_ONSETS += ("z", "th", "sh", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "ei")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "x", "k", "nd", "rn")
_TOWN_ENDINGS = ("by", "ford", "holm", "wick", "stead", "mere", "ton", "dale", "worth", "haven")
_COMPANY_ENDINGS = ("Works", "Labs", "and Sons", "Logistics", "Instruments", "Foods", "Textiles")
_PRODUCTS = ("garden robots", "paper lanterns", "bicycle parts", "weather balloons", "bathroom tiles", "toy trains")
_PRODUCTS += ("hearing aids", "rope ladders", "ice skates", "solar kettles")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
_MONTHS += ("November", "December")

# A fact: (kind, slot, statement templates, reaction-free question templates (direct, paraphrase), answer maker).
# In templates, {x} is the invented answer and {owner} the speaker the fact is about; the slot names what it is about.
_PETS = ("dog", "cat", "parrot", "tortoise", "ferret", "rabbit", "goat", "hamster", "lizard", "pony")
_RELATIVES = ("sister", "brother", "cousin", "aunt", "uncle", "grandfather", "niece", "nephew", "neighbour")
_RELATIVES += ("landlord", "dentist", "piano teacher", "football coach", "accountant")
_NUMBERS = {
    "bus": (
        ("I take bus number {x} to work every morning, it is always late.", "Bus {x} was packed again today."),
        ("Which bus number does {owner} take to work?", "What bus does {owner} ride to work each morning?"),
        (11, 399),
    ),
    "books": (
        ("I've read {x} books this year, can you believe it?", "My reading log says {x} books so far this year."),
        ("How many books has {owner} read this year?", "What number of books did {owner} get through this year?"),
        (13, 97),
    ),
    "grandmother": (
        ("My grandmother just turned {x} last Sunday, we had a big party.", "Grandma is {x} now and still gardens."),
        ("How old is {owner}'s grandmother?", "What age did {owner}'s grandmother reach?"),
        (81, 104),
    ),
    "floor": (
        ("We moved up to floor {x} of our building, the view is amazing.", "Our flat is on floor {x} now."),
        ("On which floor does {owner} live?", "How high up is {owner}'s flat, which floor?"),
        (12, 58),
    ),
    "marathon": (
        ("I finished the marathon in {x} minutes, my best time ever!", "My marathon time was {x} minutes."),
        ("How many minutes did {owner} need for the marathon?", "What was {owner}'s marathon time in minutes?"),
        (181, 297),
    ),
}
_DATES = {
    "wedding": (
        ("Our wedding is set for {x}, I'm so nervous.", "We finally picked a date for the wedding: {x}."),
        ("When is {owner}'s wedding?", "On what date will {owner} get married?"),
    ),
    "exam": (
        ("My pilot licence exam is on {x}, wish me luck.", "They scheduled my flying exam for {x}."),
        ("When is {owner}'s pilot licence exam?", "On which date does {owner} take the flying test?"),
    ),
    "move": (
        ("We are moving house on {x}, the boxes are everywhere.", "The movers come on {x}."),
        ("When is {owner} moving house?", "On what date do the movers come for {owner}?"),
    ),
}
_NAMED = {
    "boat": (
        ("I bought an old sailing boat and called it the {x}.", "The {x} is my new boat, a little wooden sloop."),
        ("What did {owner} name the sailing boat?", "What is {owner}'s boat called?"),
    ),
    "band": (
        ("Our band has a name at last: {x}.", "I play bass in a band called {x} now."),
        ("What is the name of {owner}'s band?", "Which band does {owner} play in?"),
    ),
    "dish": (
        ("My favourite dish is {x} stew, my mum's recipe.", "Nothing beats a bowl of {x} stew after work."),
        ("What is {owner}'s favourite dish?", "Which stew does {owner} love most?"),
    ),
    "cafe": (
        ("We always meet at a little cafe called {x} near the station.", "The cafe {x} has the best cake in town."),
        ("What is the name of the cafe where {owner} meets friends?", "Which cafe does {owner} go to?"),
    ),
    "street": (
        ("We moved to {x} Street last month.", "Our new place is on {x} Street, right by the park."),
        ("Which street did {owner} move to?", "On what street does {owner} live now?"),
    ),
}
_SMALL_TALK = (
    "The weather has been awful lately, rain every single day.",
    "I spent most of the weekend cleaning the flat, nothing exciting.",
    "Work has been really busy this week, I barely had time to eat.",
    "Did you watch anything good recently? I need a new series.",
    "I tried a new recipe yesterday and it actually turned out fine.",
    "My back hurts from sitting at the desk all day.",
    "We went for a long walk by the river on Sunday.",
    "I have been sleeping badly, too much coffee probably.",
    "The traffic this morning was unbelievable.",
    "I finally fixed the leaking tap in the kitchen.",
    "Honestly I just want a quiet evening with a good book.",
    "My phone screen cracked again, I should buy a case.",
    "We had friends over for dinner, it was a lovely evening.",
    "I started running again, slowly, very slowly.",
    "The garden is full of weeds after all that rain.",
    "I keep forgetting to call my parents back.",
    "The supermarket was out of bread again, so annoying.",
    "I am thinking about taking a few days off soon.",
    "We painted the living room a pale green, it looks calm.",
    "Nothing much new here, just the usual routine.",
    "How is your family doing these days?",
    "What have you been up to since we last talked?",
    "Any plans for the holidays yet?",
    "I saw a great documentary about whales last night.",
    "My cooking skills are slowly improving, I think.",
    "It has been a long week, I am glad it is almost over.",
    "The neighbours are renovating again, drilling all morning.",
    "I signed up for a pottery class, just for fun.",
)
_REACTIONS = (
    "Oh wow, that's great news!",
    "Ha, I love that.",
    "That sounds lovely, tell me more next time.",
    "No way! Good for you.",
    "Really? I had no idea.",
    "That is so exciting, I'm happy for you.",
    "Nice, you always surprise me.",
    "Oh, interesting! How do you feel about it?",
    "That's wonderful, congratulations.",
    "Haha, that made me smile.",
)
_OPENINGS = ("Hey {other}! How have you been?", "Hi {other}, good to hear from you.", "{other}! It's been a while.")
_CLOSINGS = ("Talk soon, take care!", "I have to run, bye for now!", "Great catching up, speak soon.")
_REPLIES_TO_OPENING = ("Hi! I'm good, thanks, and you?", "Hey! Busy as always, but fine.", "So good to hear from you!")


def invented_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word, capitalised (e.g. "Brelvanor")."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(*syllables))]
    return "".join(parts).capitalize()


class _Names:
    """Invented words never used twice in one probe (so every answer names one fact)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def new(self, make: Callable[[], str]) -> str:
        while (word := make()).lower() in self.used:
            pass
        self.used.add(word.lower())
        return word


def _fact_kinds() -> list[tuple[str, str]]:
    """Every (kind, slot) a speaker can state once, in a fixed order."""
    kinds = [("pet", animal) for animal in _PETS] + [("relative", who) for who in _RELATIVES]
    kinds += [("hometown", ""), ("employer", "")]
    kinds += [("number", slot) for slot in _NUMBERS] + [("date", slot) for slot in _DATES]
    return kinds + [("named", slot) for slot in _NAMED]


def _make_fact(kind: str, slot: str, owner: str, rng: random.Random, names: _Names) -> dict[str, str]:
    """The fact's turn text, the question (direct or paraphrased) and the gold answer."""
    paraphrase = rng.random() < 0.5
    if kind == "pet":
        x = names.new(lambda: invented_word(rng, (2, 2)))
        statements = (f"We finally adopted a {slot}! We named it {x}.", f"My {slot} {x} chewed through a cable again.")
        questions = (f"What is the name of {owner}'s {slot}?", f"What did {owner} call their {slot}?")
    elif kind == "relative":
        x = names.new(lambda: invented_word(rng, (2, 3)))
        statements = (f"My {slot} {x} is coming to stay with us next week.", f"I had lunch with my {slot} {x} today.")
        questions = (f"What is the name of {owner}'s {slot}?", f"Who is {owner}'s {slot}?")
    elif kind == "hometown":
        x = names.new(lambda: invented_word(rng, (1, 2)) + rng.choice(_TOWN_ENDINGS))
        statements = (f"I grew up in {x}, a small town up in the hills.", f"Back in {x}, where I grew up, it snowed.")
        questions = (f"Where did {owner} grow up?", f"Which town is {owner} originally from?")
    elif kind == "employer":
        x = names.new(lambda: f"{invented_word(rng, (2, 2))} {rng.choice(_COMPANY_ENDINGS)}")
        product = rng.choice(_PRODUCTS)
        statements = (f"I just started a new job at {x}, they make {product}.", f"{x} hired me! They build {product}.")
        questions = (f"Which company did {owner} start working for?", f"Who is {owner}'s new employer?")
    elif kind == "number":
        templates, questions, (low, high) = _NUMBERS[slot]
        x = names.new(lambda: str(rng.randint(low, high)))
        statements = tuple(t.format(x=x) for t in templates)
        questions = tuple(q.format(owner=owner) for q in questions)
    elif kind == "date":
        templates, questions = _DATES[slot]
        x = names.new(lambda: f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}")
        statements = tuple(t.format(x=x) for t in templates)
        questions = tuple(q.format(owner=owner) for q in questions)
    else:
        templates, questions = _NAMED[slot]
        x = names.new(lambda: invented_word(rng, (2, 3)))
        statements = tuple(t.format(x=x) for t in templates)
        questions = tuple(q.format(owner=owner) for q in questions)
    return {
        "text": rng.choice(statements),
        "question": questions[paraphrase],
        "answer": x,
        "phrasing": "paraphrase" if paraphrase else "direct",
        "kind": f"{kind} {slot}".strip(),
    }


def generate_probe(
    facts: int = 40, tokens: int = 12_000, seed: int = 0, count_tokens: Callable[[str], int] | None = None
) -> list[dict[str, Any]]:
    """One LoCoMo-layout sample (in a list, as ``locomo10.json``) with ``facts`` invented facts and questions.

    The conversation runs until every fact is stated and its rendered turns reach ``tokens`` tokens (by
    ``count_tokens``, default ``len(text) / CHARS_PER_TOKEN``); fact ``i`` is stated once the text reaches
    ``tokens * (i + 0.5) / facts``, so the facts are spread evenly. Deterministic in its arguments.

    Raises:
        ValueError: ``facts`` or ``tokens`` not a positive integer, or more facts than two speakers can hold
            (``2 * len(_fact_kinds())``).
    """
    for name, value in (("facts", facts), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_probe: `{name}` must be a positive integer, got {value!r}")
    capacity = 2 * len(_fact_kinds())
    if facts > capacity:
        raise ValueError(f"generate_probe: at most {capacity} facts fit two speakers' fact kinds, got {facts}")
    count = count_tokens or (lambda text: -(-len(text) // CHARS_PER_TOKEN))
    rng = random.Random(seed)
    names = _Names(rng)
    speakers = [names.new(lambda: invented_word(rng, (2, 2))) for _ in range(2)]
    unused = {speaker: _fact_kinds() for speaker in speakers}
    when = datetime(2031, 1, 1) + timedelta(days=rng.randint(0, 700), minutes=rng.randint(8 * 60, 21 * 60))

    conversation: dict[str, Any] = {"speaker_a": speakers[0], "speaker_b": speakers[1]}
    qa: list[dict[str, Any]] = []
    used_tokens, placed, session = 0, 0, 0
    while placed < facts or used_tokens < tokens:
        session += 1
        clock = f"{when.hour % 12 or 12}:{when.minute:02d} {'am' if when.hour < 12 else 'pm'}"
        date = f"{clock} on {when.day} {_MONTHS[when.month - 1]}, {when.year}"
        conversation[f"session_{session}_date_time"] = date
        used_tokens += count(f"[Session {session} - {date}]\n\n")
        turns: list[dict[str, str]] = []
        speaker = rng.randrange(2)
        length = rng.randint(12, 22)

        def say(text: str, current: int, turns: list[dict[str, str]] = turns, session: int = session) -> None:
            nonlocal used_tokens
            name = speakers[current]
            turns.append({"speaker": name, "dia_id": f"D{session}:{len(turns) + 1}", "text": text})
            used_tokens += count(f"{name}: {text}\n")

        other = speakers[1 - speaker]
        say(rng.choice(_OPENINGS).format(other=other), speaker)
        speaker = 1 - speaker
        say(rng.choice(_REPLIES_TO_OPENING), speaker)
        while len(turns) < length - 1:
            speaker = 1 - speaker
            due = placed < facts and used_tokens >= tokens * (placed + 0.5) / facts
            if due and len(turns) < length - 2:
                owner = speakers[speaker]
                # a kind first, then one of its slots: kinds with many slots (pets, relatives) would crowd out the rest
                kind = rng.choice(sorted({kind for kind, _ in unused[owner]}))
                slot = rng.choice([slot for k, slot in unused[owner] if k == kind])
                unused[owner].remove((kind, slot))
                fact = _make_fact(kind, slot, owner, rng, names)
                say(fact["text"], speaker)
                qa.append(
                    {
                        "question": fact["question"],
                        "answer": fact["answer"],
                        "evidence": [turns[-1]["dia_id"]],
                        "category": 4,
                        "phrasing": fact["phrasing"],
                        "fact": fact["kind"],
                    }
                )
                placed += 1
                speaker = 1 - speaker
                say(rng.choice(_REACTIONS), speaker)
            else:
                say(rng.choice(_SMALL_TALK), speaker)
        speaker = 1 - speaker
        say(rng.choice(_CLOSINGS), speaker)
        conversation[f"session_{session}"] = turns
        when += timedelta(days=rng.randint(2, 21), minutes=rng.randint(-180, 180))
    generator = {"facts": facts, "tokens": tokens, "seed": seed, "counted_tokens": used_tokens}
    return [{"sample_id": f"probe-{seed}", "generator": generator, "conversation": conversation, "qa": qa}]


def write_probe(path: str | Path, **kwargs: Any) -> Path:
    """`generate_probe(**kwargs)` written as JSON to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(generate_probe(**kwargs), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=40, help="invented facts, one question each")
    parser.add_argument("--tokens", type=int, default=12_000, help=f"length in tokens (~{CHARS_PER_TOKEN} chars)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="where to write the LoCoMo-layout JSON")
    args = parser.parse_args(argv)
    try:
        path = write_probe(args.out, facts=args.facts, tokens=args.tokens, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
