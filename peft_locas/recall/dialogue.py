"""Conversations as memorisation input: LoCoMo samples or a turns JSONL file, rendered to one deterministic text.

A conversation is a sequence of sessions, each a dated list of turns. `render_conversation` turns it into the exact
text that is memorised *and* later shown or asked about (the same function for both, so the two never drift apart):

```text
[Session 1 - 1:56 pm on 8 May, 2023]
Caroline: Hey Mel! Good to see you! How have you been?
Melanie: Hey Caroline! I'm swamped with the kids & work. [shares a photo: a photo of a pottery bowl]

[Session 2]
Caroline: ...
```

One header line per session (``[Session N - <date_time>]``, or ``[Session N]`` without a date; ASCII hyphen rather
than an em dash so the header tokenises the same way in every vocabulary), one ``Speaker: text`` line per turn (a
turn's internal line breaks become spaces, so one turn is one line), sessions separated by one blank line, no
trailing newline. `turn_spans` gives the exact character span of every header and turn line: a chunk of the
memorised text may begin only at one of them, never in the middle of a turn.

Images: a LoCoMo turn that shared a photo carries its BLIP caption, rendered ``[shares a photo: <caption>]`` after
the text. LoCoMo's own evaluation code appends ``"and shared <caption>"``; the bracketed form is kept short and
marked as not-said, so a model memorising the text does not learn the caption as the speaker's words.

Inputs (`load_conversation`):

- **LoCoMo JSON** (Maharana et al., ACL 2024; ``locomo10.json`` from snap-research/LoCoMo): one sample object or a
  list of them. A sample has ``sample_id``, ``conversation`` (``speaker_a``, ``speaker_b``, ``session_N`` lists of
  turns ``{speaker, dia_id, text, optional blip_caption/img_url/query}``, ``session_N_date_time``) and ``qa``.
  Sessions are ordered by N numerically; other keys (``session_N_date_time``, summaries) are not sessions.
- **Turns JSONL** (this package's form), one JSON object per line, in order; blank lines are skipped:

  ```text
  {"speaker": "Ann", "text": "I moved to Lyon last week.", "session": 1, "date_time": "8 May 2023, 1:56 pm"}
  {"speaker": "Bob", "text": "How is it?", "id": "bob-1"}
  {"speaker": "Ann", "text": "Rainy!", "session": 2, "date_time": "20 May 2023"}
  {"speaker": "Bob", "text": "Look at this.", "caption": "a photo of a bike"}
  ```

  ``speaker`` and ``text`` are required (non-empty strings). ``session`` (a positive integer) defaults to the previous
  line's (1 on the first line) and may never go back. ``date_time`` is the session's date, given on any one or more
  lines of that session (conflicting values are an error). ``id`` is the turn's id (default ``D<session>:<k>``, the
  k-th turn of the session, as LoCoMo numbers them; ids must be unique). ``caption`` describes a shared image.

Questions (`read_questions`): JSONL, one object per line with ``question`` (required), optional ``answer``,
``category`` (LoCoMo's ids, see `peft_locas.recall.metrics.CATEGORIES`) and ``evidence`` (turn ids); other keys are
kept in `Question.extra`. A LoCoMo JSON file works too (its ``qa``).

Every input problem raises `DialogueError`: one line naming the file (and line or sample) and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "Conversation",
    "DialogueError",
    "Question",
    "Session",
    "Turn",
    "TurnSpan",
    "is_conversation_file",
    "load_conversation",
    "read_questions",
    "render_conversation",
    "turn_spans",
]

_FORMS = "a LoCoMo JSON file (.json) or a turns JSONL file (.jsonl, see peft_locas.recall.dialogue)"
_SESSION_KEY = re.compile(r"session_(\d+)")
# Every character str.splitlines() breaks on: a rendered turn must stay one line for any reader.
_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+\s*")
# LoCoMo ids are "D<session>:<turn>"; its qa evidence holds a few malformed ones ("D:11:26", "D8:6; D9:17", "D").
_LOCOMO_ID = re.compile(r"D:?(\d+):(\d+)")
_LOCOMO_FRAGMENT = re.compile(r"D:?")
_EVIDENCE_SEPARATORS = re.compile(r"[\s;,]+")
_TURN_KEYS = ("speaker", "text", "session", "date_time", "id", "caption")
_QUESTION_KEYS = ("question", "answer", "category", "evidence")


class DialogueError(ValueError):
    """A conversation or questions file that cannot be read; the message names the file, the place and the fix."""


@dataclass(frozen=True)
class Turn:
    """One utterance: ``speaker`` said ``text`` (raw, as loaded); ``dia_id`` its id (LoCoMo's ``"D1:3"``);
    ``caption`` the description of an image the speaker shared, if any."""

    speaker: str
    text: str
    dia_id: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Session:
    """A numbered conversation session (``number`` as in the source, 1-based) with its date string, if known."""

    number: int
    date_time: str | None
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "turns", tuple(self.turns))


@dataclass(frozen=True)
class Question:
    """A question about a conversation, with its gold ``answer`` (None for LoCoMo's adversarial questions, whose
    tempting wrong answer is ``extra["adversarial_answer"]``), LoCoMo ``category`` id, ``evidence`` turn ids, and any
    other keys of the source object in ``extra`` (read-only)."""

    question: str
    answer: str | None = None
    category: int | None = None
    evidence: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", tuple(self.evidence))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


@dataclass(frozen=True)
class Conversation:
    """Sessions in order, the questions asked about them (may be empty) and the LoCoMo ``sample_id`` (or None)."""

    sample_id: str | None
    sessions: tuple[Session, ...]
    questions: tuple[Question, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sessions", tuple(self.sessions))
        object.__setattr__(self, "questions", tuple(self.questions))

    @property
    def speakers(self) -> tuple[str, ...]:
        """The distinct speakers, in order of first appearance."""
        return tuple(dict.fromkeys(turn.speaker for session in self.sessions for turn in session.turns))


@dataclass(frozen=True)
class TurnSpan:
    """``render_conversation(c)[start:end]`` is one rendered line (no newline): a session header (``dia_id`` None)
    or a turn (its ``dia_id``, which may also be None for a turn built without one)."""

    start: int
    end: int
    dia_id: str | None


def render_conversation(conversation: Conversation) -> str:
    """The conversation as deterministic text (format in the module docstring); "" for no sessions."""
    return _render(conversation)[0]


def turn_spans(conversation: Conversation) -> list[TurnSpan]:
    """Character spans in `render_conversation` of every header and turn line, in text order."""
    return _render(conversation)[1]


def _render(conversation: Conversation) -> tuple[str, list[TurnSpan]]:
    # One builder for the text and the spans, so the spans cannot disagree with the text.
    parts: list[str] = []
    spans: list[TurnSpan] = []
    position = 0

    def add(line: str, dia_id: str | None, separator: str) -> None:
        nonlocal position
        if parts:
            parts.append(separator)
            position += len(separator)
        parts.append(line)
        spans.append(TurnSpan(position, position + len(line), dia_id))
        position += len(line)

    for session in conversation.sessions:
        date = _one_line(session.date_time) if session.date_time else ""
        add(f"[Session {session.number} - {date}]" if date else f"[Session {session.number}]", None, "\n\n")
        for turn in session.turns:
            add(_turn_line(turn), turn.dia_id, "\n")
    return "".join(parts), spans


def _turn_line(turn: Turn) -> str:
    caption = _one_line(turn.caption) if turn.caption else ""
    words = [_one_line(turn.text), f"[shares a photo: {caption}]" if caption else ""]
    body = " ".join(word for word in words if word)
    return f"{_one_line(turn.speaker)}: {body}" if body else f"{_one_line(turn.speaker)}:"


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text).strip()


def is_conversation_file(path: str | os.PathLike) -> bool:
    """True when ``path`` names a ``.json`` or ``.jsonl`` file (by its name: a missing one then fails in
    `load_conversation` with a clear error rather than being taken for something else)."""
    return Path(path).suffix.lower() in (".json", ".jsonl")


def load_conversation(path: str | os.PathLike, sample: str | None = None) -> Conversation:
    """Read a conversation from a LoCoMo JSON file or a turns JSONL file (``.jsonl``; forms in the module docstring).

    ``sample`` picks a LoCoMo sample by ``sample_id`` from a file holding a list of them (default: the first); it
    must be None for JSONL. LoCoMo questions come along in `Conversation.questions`; JSONL conversations have none.

    Raises:
        DialogueError: missing file, not JSON, no ``conversation``, no sessions, no turns, unknown sample, a malformed
            turn or line; one line naming the file and the fix.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        if sample is not None:
            raise DialogueError(
                f"{path}: a turns JSONL file holds one conversation; do not pick a sample (--sample {sample})"
            )
        return _load_turns_jsonl(path)
    data = _read_json(path)
    sample_data = _pick_sample(path, data, sample)
    where = _where(path, sample_data)
    conversation = sample_data.get("conversation")
    if not isinstance(conversation, dict):
        problem = "no 'conversation' object" if conversation is None else "'conversation' is not an object"
        raise DialogueError(f"{where}: {problem}; give {_FORMS}")
    numbers = sorted(int(m.group(1)) for key in conversation if (m := _SESSION_KEY.fullmatch(key)))
    if not numbers:
        raise DialogueError(f"{where}: the conversation has no session_N lists of turns; give {_FORMS}")
    sessions = tuple(_locomo_session(where, conversation, number) for number in numbers)
    if not any(session.turns for session in sessions):
        raise DialogueError(f"{where}: the conversation is empty (no turns in any session); give {_FORMS}")
    questions = _locomo_questions(where, sample_data) if "qa" in sample_data else ()
    return Conversation(sample_id=_sample_id(sample_data), sessions=sessions, questions=questions)


def read_questions(path: str | os.PathLike, sample: str | None = None) -> list[Question]:
    """Questions from a JSONL file (one object per line: ``question``, optional ``answer``, ``category``,
    ``evidence``, other keys into `Question.extra`) or from a LoCoMo JSON file (``.json``: its ``qa``; ``sample`` as
    in `load_conversation`). Answers that are numbers (LoCoMo has years as ints) become strings.

    Raises:
        DialogueError: missing file, bad JSON, a line that is not an object or lacks ``question``; one line naming
            the file, the line and the fix.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        sample_data = _pick_sample(path, _read_json(path), sample)
        return list(_locomo_questions(_where(path, sample_data), sample_data))
    if sample is not None:
        raise DialogueError(
            f"{path}: a questions JSONL file holds one list of questions; do not pick a sample (--sample {sample})"
        )
    return [_question(f"{path}:{number}", item) for number, item in _jsonl_objects(path)]


def _where(path: Path, sample_data: dict) -> str:
    sample_id = _sample_id(sample_data)
    return f"{path}: sample {sample_id}" if sample_id is not None else str(path)


def _locomo_questions(where: str, sample_data: dict) -> tuple[Question, ...]:
    qa = sample_data.get("qa")
    if not isinstance(qa, list):
        problem = "no 'qa' list of questions" if qa is None else "'qa' is not a list"
        raise DialogueError(f"{where}: {problem}; LoCoMo's qa is a list of question objects")
    return tuple(_question(f"{where} qa {i + 1}", item) for i, item in enumerate(qa))


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DialogueError(f"{path}: not JSON ({error.msg} at {where}); give {_FORMS}") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "no such file"
        raise DialogueError(f"{path}: {problem}; give the path of {_FORMS}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DialogueError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8 JSON") from None


def _pick_sample(path: Path, data: Any, sample: str | None) -> dict:
    if isinstance(data, dict):
        if sample is not None and _sample_id(data) != sample:
            raise DialogueError(f"{path}: no sample {sample!r}; the file holds one sample, {_sample_id(data)!r}")
        return data
    if not isinstance(data, list):
        raise DialogueError(f"{path}: top level is a {type(data).__name__}; give {_FORMS}")
    if not data:
        raise DialogueError(f"{path}: empty list of samples; give {_FORMS}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DialogueError(f"{path}: item {i + 1} of the list is not an object; give {_FORMS}")
    if sample is None:
        return data[0]
    for item in data:
        if _sample_id(item) == sample:
            return item
    available = ", ".join(str(_sample_id(item)) for item in data)
    raise DialogueError(f"{path}: no sample {sample!r}; available: {available}")


def _sample_id(data: dict) -> str | None:
    sample_id = data.get("sample_id")
    return None if sample_id is None else str(sample_id)


def _locomo_session(where: str, conversation: dict, number: int) -> Session:
    key = f"session_{number}"
    turns = conversation[key]
    if not isinstance(turns, list):
        raise DialogueError(f"{where}: {key} is not a list of turns; a LoCoMo session is a list of turn objects")
    date_time = conversation.get(f"{key}_date_time")
    if date_time is not None and not isinstance(date_time, str):
        raise DialogueError(f"{where}: {key}_date_time is not a string; write the date as text")
    return Session(
        number, date_time or None, tuple(_locomo_turn(f"{where} {key} turn {i + 1}", t) for i, t in enumerate(turns))
    )


def _locomo_turn(where: str, item: Any) -> Turn:
    if not isinstance(item, dict):
        raise DialogueError(f"{where}: not an object; a LoCoMo turn is {{speaker, dia_id, text}}")
    speaker, text = item.get("speaker"), item.get("text")
    for name, value in (("speaker", speaker), ("text", text)):
        if not isinstance(value, str):
            problem = f"missing '{name}'" if value is None else f"'{name}' is not a string"
            raise DialogueError(f"{where}: {problem}; a LoCoMo turn is {{speaker, dia_id, text}}")
    dia_id, caption = item.get("dia_id"), item.get("blip_caption")
    return Turn(
        speaker=speaker,
        text=text,
        dia_id=None if dia_id is None else str(dia_id),
        caption=caption if isinstance(caption, str) and caption.strip() else None,
    )


def _load_turns_jsonl(path: Path) -> Conversation:
    sessions: list[Session] = []
    turns: list[Turn] = []
    number, date_time, date_line = 1, None, 0
    seen_ids: dict[str, int] = {}

    def close_session() -> None:
        if turns:
            sessions.append(Session(number, date_time, tuple(turns)))

    for line_number, item in _jsonl_objects(path):
        where = f"{path}:{line_number}"
        unknown = [key for key in item if key not in _TURN_KEYS]
        if unknown:
            raise DialogueError(f"{where}: unknown key {unknown[0]!r}; a turn has the keys {', '.join(_TURN_KEYS)}")
        for name in ("speaker", "text"):
            value = item.get(name)
            if not isinstance(value, str) or not value.strip():
                problem = f"missing '{name}'" if value is None else f"'{name}' is not a non-empty string"
                raise DialogueError(f'{where}: {problem}; every line needs "speaker" and "text" strings')
        session = item.get("session", number)
        if isinstance(session, bool) or not isinstance(session, int) or session < 1:
            raise DialogueError(f"{where}: 'session' is {session!r}; write a positive integer")
        if session < number:
            raise DialogueError(f"{where}: session {session} after session {number}; put the lines in session order")
        if session > number:
            close_session()
            turns, number, date_time, date_line = [], session, None, 0
        line_date = item.get("date_time")
        if line_date is not None:
            if not isinstance(line_date, str):
                raise DialogueError(f"{where}: 'date_time' is not a string; write the session's date as text")
            if date_time is not None and line_date != date_time:
                raise DialogueError(
                    f"{where}: date_time {line_date!r} conflicts with {date_time!r} (line {date_line}) for "
                    f"session {number}; give one date per session"
                )
            date_time, date_line = line_date, line_number
        turn_id = item.get("id", f"D{number}:{len(turns) + 1}")
        if not isinstance(turn_id, str) or not turn_id:
            raise DialogueError(f"{where}: 'id' is {turn_id!r}; write a non-empty string or leave it out")
        if turn_id in seen_ids:
            raise DialogueError(f"{where}: id {turn_id!r} already used on line {seen_ids[turn_id]}; ids must be unique")
        seen_ids[turn_id] = line_number
        caption = item.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DialogueError(f"{where}: 'caption' is not a string; describe the image as text or leave it out")
        turns.append(Turn(item["speaker"], item["text"], turn_id, caption or None))
    close_session()
    if not sessions:
        raise DialogueError(f"{path}: empty (no turns); write one JSON turn per line, see peft_locas.recall.dialogue")
    return Conversation(sample_id=None, sessions=tuple(sessions))


def _jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    objects = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DialogueError(
                f"{path}:{line_number}: bad JSON ({error.msg} at column {error.colno}); write one JSON object per line"
            ) from None
        if not isinstance(item, dict):
            raise DialogueError(
                f"{path}:{line_number}: a {type(item).__name__}, not an object; write one JSON object per line"
            )
        objects.append((line_number, item))
    return objects


def _question(where: str, item: Any) -> Question:
    if not isinstance(item, dict):
        raise DialogueError(f'{where}: not an object; a question is {{"question": ..., "answer": ...}}')
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        problem = "missing 'question'" if question is None else "'question' is not a non-empty string"
        raise DialogueError(f'{where}: {problem}; every question object needs a "question" string')
    answer = item.get("answer")
    if isinstance(answer, bool) or not (answer is None or isinstance(answer, (str, int, float))):
        raise DialogueError(f"{where}: 'answer' is {answer!r}; write the gold answer as a string")
    category = item.get("category")
    if category is not None and (isinstance(category, bool) or not isinstance(category, int)):
        raise DialogueError(f"{where}: 'category' is {category!r}; write LoCoMo's integer category id (1-5)")
    return Question(
        question=question,
        answer=None if answer is None else str(answer),
        category=category,
        evidence=_evidence_ids(where, item.get("evidence", [])),
        extra={key: value for key, value in item.items() if key not in _QUESTION_KEYS},
    )


def _evidence_ids(where: str, evidence: Any) -> tuple[str, ...]:
    """Clean turn ids: split strings holding several ("D8:6; D9:17"), repair LoCoMo's "D:11:26" to "D11:26", drop
    the stray fragment "D", and drop repeats (order kept)."""
    values = [evidence] if isinstance(evidence, str) else evidence
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise DialogueError(f"{where}: 'evidence' is {evidence!r}; write a list of turn id strings")
    ids: dict[str, None] = {}
    for value in values:
        for piece in _EVIDENCE_SEPARATORS.split(value):
            if not piece or _LOCOMO_FRAGMENT.fullmatch(piece):
                continue
            match = _LOCOMO_ID.fullmatch(piece)
            ids[f"D{match.group(1)}:{match.group(2)}" if match else piece] = None
    return tuple(ids)
