"""Conversations as input: the rendered text and its exact turn spans, LoCoMo JSON and turns JSONL loading (with their
one-line errors), questions files, and the real LoCoMo data when it is present."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from peft_locas.recall.dialogue import (
    Conversation,
    DialogueError,
    Question,
    Session,
    Turn,
    TurnSpan,
    is_conversation_file,
    load_conversation,
    read_questions,
    render_conversation,
    turn_spans,
)

REPO = Path(__file__).resolve().parents[1]
# CC BY-NC data: read from the shared folder next to the checkout, never copied into the repository.
LOCOMO = REPO.parent / "shared" / "data" / "locomo" / "locomo10.json"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def locomo_sample(sample_id: str = "conv-1") -> dict:
    """A small sample shaped like LoCoMo's, with its quirks: session_10 sorts after session_2, non-session keys,
    an image turn, a year stored as an int, an adversarial question and malformed evidence ids."""
    return {
        "sample_id": sample_id,
        "conversation": {
            "speaker_a": "Ann",
            "speaker_b": "Bob",
            "session_10": [{"speaker": "Bob", "dia_id": "D10:1", "text": "Back again."}],
            "session_10_date_time": "9:00 am on 1 June, 2023",
            "session_2": [
                {"speaker": "Bob", "dia_id": "D2:1", "text": "Hi!\n\nLook.", "blip_caption": "a photo of a cat"},
                {"speaker": "Ann", "dia_id": "D2:2", "text": "Cute."},
            ],
            "session_2_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I painted a sunrise in 2022."}],
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1_summary": "Ann painted.",
            "session_11_date_time": "a date whose session has no turns in the file",
        },
        "qa": [
            {"question": "When did Ann paint a sunrise?", "answer": 2022, "evidence": ["D1:1"], "category": 2},
            {
                "question": "What did Bob share?",
                "answer": "a cat photo",
                "evidence": ["D8:6; D9:17", "D", "D:11:26"],
                "category": 4,
            },
            {
                "question": "Did Ann adopt the cat?",
                "adversarial_answer": "yes",
                "evidence": ["D2:2", "D2:2"],
                "category": 5,
            },
        ],
        "session_summary": {"session_1_summary": "Ann painted."},
    }


def test_render_is_deterministic_text_with_exact_spans():
    conversation = Conversation(
        sample_id=None,
        sessions=(
            Session(1, "1:56 pm on 8 May, 2023", (Turn("Ann", "Hi Bob!", "D1:1"), Turn("Bob", "\nHey\r\n there \n\n"))),
            Session(3, None, (Turn("Ann", "Look\u2028here", "x", caption="a photo of a\ncat"), Turn("Bob", "", "y"))),
        ),
    )
    text = render_conversation(conversation)
    assert text == (
        "[Session 1 - 1:56 pm on 8 May, 2023]\n"
        "Ann: Hi Bob!\n"
        "Bob: Hey there\n"
        "\n"
        "[Session 3]\n"
        "Ann: Look here [shares a photo: a photo of a cat]\n"
        "Bob:"
    )
    spans = turn_spans(conversation)
    assert [span.dia_id for span in spans] == [None, "D1:1", None, None, "x", "y"]
    lines = [line for line in text.splitlines() if line]
    assert [text[span.start : span.end] for span in spans] == lines
    assert spans[0] == TurnSpan(0, len("[Session 1 - 1:56 pm on 8 May, 2023]"), None)
    assert spans[-1].end == len(text)
    assert render_conversation(conversation) == text and turn_spans(conversation) == spans
    assert conversation.speakers == ("Ann", "Bob")
    assert render_conversation(Conversation(None, ())) == "" and turn_spans(Conversation(None, ())) == []


def test_dataclasses_are_frozen_and_questions_hashable():
    question = Question("Q?", "A", 4, ["D1:1"], {"note": 1})
    assert question.evidence == ("D1:1",) and question.extra == {"note": 1}
    assert hash(question) == hash(Question("Q?", "A", 4, ("D1:1",), {"other": 2}))
    with pytest.raises(TypeError):
        question.extra["note"] = 2
    with pytest.raises(AttributeError):
        question.answer = "B"


def test_locomo_sample_loads_in_session_order_with_clean_questions(tmp_path):
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([locomo_sample("conv-1"), locomo_sample("conv-2")]))
    conversation = load_conversation(path)
    assert conversation.sample_id == "conv-1"
    assert [s.number for s in conversation.sessions] == [1, 2, 10]
    assert [s.date_time for s in conversation.sessions] == [
        "1:00 pm on 1 May, 2023",
        "1:56 pm on 8 May, 2023",
        "9:00 am on 1 June, 2023",
    ]
    assert conversation.sessions[1].turns[0] == Turn("Bob", "Hi!\n\nLook.", "D2:1", "a photo of a cat")
    assert conversation.speakers == ("Ann", "Bob")
    assert render_conversation(conversation) == (
        "[Session 1 - 1:00 pm on 1 May, 2023]\n"
        "Ann: I painted a sunrise in 2022.\n"
        "\n"
        "[Session 2 - 1:56 pm on 8 May, 2023]\n"
        "Bob: Hi! Look. [shares a photo: a photo of a cat]\n"
        "Ann: Cute.\n"
        "\n"
        "[Session 10 - 9:00 am on 1 June, 2023]\n"
        "Bob: Back again."
    )
    assert conversation.questions == (
        Question("When did Ann paint a sunrise?", "2022", 2, ("D1:1",)),
        Question("What did Bob share?", "a cat photo", 4, ("D8:6", "D9:17", "D11:26")),
        Question("Did Ann adopt the cat?", None, 5, ("D2:2",), {"adversarial_answer": "yes"}),
    )
    assert load_conversation(path, sample="conv-2").sample_id == "conv-2"
    single = tmp_path / "single.json"
    single.write_text(json.dumps(locomo_sample("conv-7")))
    assert load_conversation(single).sessions == conversation.sessions
    assert load_conversation(single, sample="conv-7").sample_id == "conv-7"
    assert read_questions(path, sample="conv-2") == list(conversation.questions)
    with pytest.raises(DialogueError) as error:
        load_conversation(path, sample="conv-9")
    assert str(error.value) == f"{path}: no sample 'conv-9'; available: conv-1, conv-2"
    with pytest.raises(DialogueError) as error:
        load_conversation(single, sample="conv-1")
    assert str(error.value) == f"{single}: no sample 'conv-1'; the file holds one sample, 'conv-7'"


FORMS = "a LoCoMo JSON file (.json) or a turns JSONL file (.jsonl, see peft_locas.recall.dialogue)"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file; give the path of " + FORMS),
        ("{not json", "not JSON (Expecting property name enclosed in double quotes at line 1 column 2); give " + FORMS),
        ("[]", "empty list of samples; give " + FORMS),
        ('"text"', "top level is a str; give " + FORMS),
        ('{"sample_id": "s", "qa": []}', "sample s: no 'conversation' object; give " + FORMS),
        (
            '{"sample_id": "s", "conversation": {"speaker_a": "A", "session_1_date_time": "today"}}',
            "sample s: the conversation has no session_N lists of turns; give " + FORMS,
        ),
        (
            '{"conversation": {"session_1": [], "session_2": []}}',
            "the conversation is empty (no turns in any session); give " + FORMS,
        ),
        (
            '{"sample_id": "s", "conversation": {"session_1": [{"speaker": "A", "dia_id": "D1:1"}]}}',
            "sample s session_1 turn 1: missing 'text'; a LoCoMo turn is {speaker, dia_id, text}",
        ),
    ],
)
def test_load_conversation_errors_are_one_line_naming_file_and_fix(tmp_path, content, problem):
    path = tmp_path / "conversation.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DialogueError) as error:
        load_conversation(path)
    assert str(error.value) == f"{path}: {problem}"
    assert "\n" not in str(error.value)


def test_turns_jsonl_sessions_dates_and_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "talk.jsonl",
        [
            {"speaker": "Ann", "text": "I moved to Lyon."},
            "",
            {"speaker": "Bob", "text": "How is it?", "date_time": "8 May 2023, 1:56 pm", "id": "bob-1"},
            {"speaker": "Ann", "text": "Rainy!", "session": 2},
            {"speaker": "Bob", "text": "Look.", "caption": "a bike", "session": 2, "date_time": "20 May 2023"},
            "   ",
            {"speaker": "Cy", "text": "Hello.", "session": 5},
        ],
    )
    conversation = load_conversation(path)
    assert conversation == Conversation(
        None,
        (
            Session(
                1, "8 May 2023, 1:56 pm", (Turn("Ann", "I moved to Lyon.", "D1:1"), Turn("Bob", "How is it?", "bob-1"))
            ),
            Session(2, "20 May 2023", (Turn("Ann", "Rainy!", "D2:1"), Turn("Bob", "Look.", "D2:2", "a bike"))),
            Session(5, None, (Turn("Cy", "Hello.", "D5:1"),)),
        ),
    )
    assert render_conversation(conversation) == (
        "[Session 1 - 8 May 2023, 1:56 pm]\nAnn: I moved to Lyon.\nBob: How is it?\n\n"
        "[Session 2 - 20 May 2023]\nAnn: Rainy!\nBob: Look. [shares a photo: a bike]\n\n[Session 5]\nCy: Hello."
    )
    assert conversation.speakers == ("Ann", "Bob", "Cy")


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (
            ['{"speaker": "A", "text": "x"', {"speaker": "B", "text": "y"}],
            "1: bad JSON (Expecting ',' delimiter at column 29); write one JSON object per line",
        ),
        ([{"speaker": "A", "text": "x"}, '["A", "x"]'], "2: a list, not an object; write one JSON object per line"),
        ([{"text": "x"}], '1: missing \'speaker\'; every line needs "speaker" and "text" strings'),
        (
            [{"speaker": "A", "text": "  "}],
            '1: \'text\' is not a non-empty string; every line needs "speaker" and "text" strings',
        ),
        (
            [
                {"speaker": "A", "text": "x", "date_time": "May"},
                {"speaker": "B", "text": "y"},
                {"speaker": "A", "text": "z", "date_time": "June"},
            ],
            "3: date_time 'June' conflicts with 'May' (line 1) for session 1; give one date per session",
        ),
        (
            [{"speaker": "A", "text": "x", "session": 2}, {"speaker": "B", "text": "y", "session": 1}],
            "2: session 1 after session 2; put the lines in session order",
        ),
        ([{"speaker": "A", "text": "x", "session": "2"}], "1: 'session' is '2'; write a positive integer"),
        (
            [{"speaker": "A", "text": "x", "sesion": 2}],
            "1: unknown key 'sesion'; a turn has the keys speaker, text, session, date_time, id, caption",
        ),
        (
            [{"speaker": "A", "text": "x", "id": "D1:2"}, {"speaker": "B", "text": "y"}],
            "2: id 'D1:2' already used on line 1; ids must be unique",
        ),
        (["", "  "], " empty (no turns); write one JSON turn per line, see peft_locas.recall.dialogue"),
    ],
)
def test_turns_jsonl_errors_name_file_and_line(tmp_path, lines, problem):
    path = write_jsonl(tmp_path / "talk.jsonl", lines)
    with pytest.raises(DialogueError) as error:
        load_conversation(path)
    assert str(error.value) == f"{path}:{problem}"


def test_read_questions_jsonl_keeps_extra_keys_and_cleans_evidence(tmp_path):
    path = write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {"question": "Where did Ann move?", "answer": "Lyon", "category": 4, "evidence": "D1:1, D1:2", "id": "q1"},
            "",
            {"question": "Which year?", "answer": 2023},
            {"question": "Who is Zed?", "category": 5, "adversarial_answer": "a dog"},
        ],
    )
    assert read_questions(path) == [
        Question("Where did Ann move?", "Lyon", 4, ("D1:1", "D1:2"), {"id": "q1"}),
        Question("Which year?", "2023"),
        Question("Who is Zed?", None, 5, (), {"adversarial_answer": "a dog"}),
    ]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([{"answer": "x"}], "1: missing 'question'; every question object needs a \"question\" string"),
        (
            [{"question": "q"}, "{bad"],
            "2: bad JSON (Expecting property name enclosed in double quotes at column 2); "
            "write one JSON object per line",
        ),
        (["7"], "1: a int, not an object; write one JSON object per line"),
        (
            [{"question": "q", "category": "temporal"}],
            "1: 'category' is 'temporal'; write LoCoMo's integer category id (1-5)",
        ),
        ([{"question": "q", "evidence": [3]}], "1: 'evidence' is [3]; write a list of turn id strings"),
    ],
)
def test_read_questions_errors_name_file_and_line(tmp_path, lines, problem):
    path = write_jsonl(tmp_path / "questions.jsonl", lines)
    with pytest.raises(DialogueError) as error:
        read_questions(path)
    assert str(error.value) == f"{path}:{problem}"


def test_is_conversation_file_goes_by_suffix(tmp_path):
    assert is_conversation_file(tmp_path / "talk.jsonl") and is_conversation_file("LoCoMo10.JSON")
    assert not is_conversation_file("emma") and not is_conversation_file(tmp_path / "book.txt")


def test_modules_import_without_torch_or_nltk():
    """Both recall input modules load on their own (outside the package, whose __init__ imports torch)."""
    script = (
        "import importlib.util, sys\n"
        "for name in ('dialogue', 'metrics'):\n"
        "    spec = importlib.util.spec_from_file_location(name, f'{sys.argv[1]}/{name}.py')\n"
        "    sys.modules[name] = module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'nltk') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "peft_locas" / "recall")], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not LOCOMO.is_file(), reason=f"LoCoMo data not present at {LOCOMO}")
def test_real_locomo_samples_load_with_the_readme_counts():
    samples = json.loads(LOCOMO.read_text())
    ids = [sample["sample_id"] for sample in samples]
    assert len(ids) == 10
    session_counts = {}
    categories = Counter()
    turns = 0
    for sample_id, raw in zip(ids, samples, strict=True):
        conversation = load_conversation(LOCOMO, sample=sample_id)
        assert conversation.sample_id == sample_id
        session_counts[sample_id] = len(conversation.sessions)
        numbers = [session.number for session in conversation.sessions]
        assert numbers == list(range(1, len(numbers) + 1))
        categories.update(question.category for question in conversation.questions)
        turns += sum(len(session.turns) for session in conversation.sessions)
        assert set(conversation.speakers) == {raw["conversation"]["speaker_a"], raw["conversation"]["speaker_b"]}
        text = render_conversation(conversation)
        spans = turn_spans(conversation)
        assert [text[s.start : s.end] for s in spans] == [line for line in text.splitlines() if line]
        dia_ids = {turn.dia_id for session in conversation.sessions for turn in session.turns}
        for question, raw_question in zip(conversation.questions, raw["qa"], strict=True):
            assert all(re.fullmatch(r"D\d+:\d+", e) for e in question.evidence)
            assert (question.answer is None) == ("answer" not in raw_question)
            if question.category == 5:
                assert question.extra["adversarial_answer"]
        assert any(e in dia_ids for q in conversation.questions for e in q.evidence)
    assert session_counts == {
        "conv-26": 19, "conv-30": 19, "conv-41": 32, "conv-42": 29, "conv-43": 29,
        "conv-44": 28, "conv-47": 31, "conv-48": 30, "conv-49": 25, "conv-50": 30,
    }  # fmt: skip
    assert dict(categories) == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    assert turns == 5882
