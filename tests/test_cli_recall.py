"""Conversations and questions through the command line, in fresh processes: memorise a dialogue, then `ask` and
`chat` it, with exact outputs and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from peft import PeftModel
from tiny_checkpoint import make_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import cli
from peft_locas.recall.asking import Asker

SMALL = ["--chunk-tokens", "64", "--context-tokens", "16", "--r", "8", "--steps-per-chunk", "1", "--lr", "1e-2"]
WORDS = "the cat sat on a mat and the dog ran to see what the bird had said about it".split()


def peft_locas(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "peft_locas", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, input=stdin)


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if not line.startswith(("Loading weights", "Failed to load CPU"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, a two-session conversation (turns JSONL) memorised into a Locas adapter by the CLI."""
    root = tmp_path_factory.mktemp("recall")
    model = make_checkpoint(root / "model")
    lines = []
    for k in range(24):
        words = " ".join(WORDS[(k + i) % len(WORDS)] for i in range(9))
        turn = {"speaker": "Ann" if k % 2 == 0 else "Bob", "text": words.capitalize() + "."}
        if k in (0, 12):
            turn.update(session=1 + k // 12, date_time=f"{8 + k} May 2023")
        lines.append(json.dumps(turn))
    conversation = root / "dialogue.jsonl"
    conversation.write_text("\n".join(lines) + "\n", encoding="utf-8")
    adapter = root / "adapter"
    done = peft_locas("memorize", "--model", str(model), "--text", str(conversation), "--out", str(adapter), *SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "model": model, "conversation": conversation, "adapter": adapter}


def test_memorize_records_the_conversation(run):
    record = json.loads((run["adapter"] / cli.RESULTS_FILE).read_text())
    assert record["text"] == "dialogue" and record["text_path"] == str(run["conversation"].resolve())
    assert record["sample"] is None and record["result"]["total_tokens"] > 64


def test_ask_answers_as_the_python_helper_does(run, tmp_path):
    questions = tmp_path / "questions.jsonl"
    rows = [{"question": "Who sat on the mat?", "answer": "the cat", "category": 4}, {"question": "What ran?"}]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = ["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--max-new-tokens", "6"]
    done = peft_locas("ask", *args, "--question", "Where is the dog?", "--questions", str(questions))
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["Where is the dog?", "Who sat on the mat?", "What ran?"]
    assert answers[1]["gold"] == "the cat" and answers[1]["category"] == 4 and 0 <= answers[1]["f1"] <= 1
    assert "gold" not in answers[0] and all(1 <= a["new_tokens"] <= 6 for a in answers)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["model"]), run["adapter"])
    asker = Asker(model, AutoTokenizer.from_pretrained(run["model"]), max_new_tokens=6)
    assert [a["answer"] for a in answers] == [asker.ask(a["question"]).text for a in answers]

    # --out: the same lines in a file, nothing on stdout; --context-tokens: the memorised text's end before each one
    out = tmp_path / "answers.jsonl"
    done = peft_locas("ask", *args, "--question", "Where is the dog?", "--context-tokens", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and f"1 answers: {out}" in done.stderr
    with_context = json.loads(out.read_text())
    assert with_context["prompt_tokens"] >= answers[0]["prompt_tokens"] + 35


def test_chat_streams_each_reply_and_leaves_at_end_of_input(run):
    args = ["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--max-new-tokens", "5"]
    done = peft_locas("chat", *args, stdin="Who sat on the mat?\n\nAnd the dog?\n")
    assert done.returncode == 0, done.stderr[-3000:]
    replies = done.stdout.split("\n")
    assert len(replies) == 3 and replies[2] == ""  # one line per question, the blank line skipped

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["model"]), run["adapter"])
    chat = Asker(model, AutoTokenizer.from_pretrained(run["model"]), max_new_tokens=5).chat()
    expected = ["".join(chat.stream("Who sat on the mat?")), "".join(chat.stream("And the dog?"))]
    assert replies[:2] == expected and chat.turns[1] == ("And the dog?", expected[1].strip())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask"], "error: no question: pass --question TEXT (repeatable) or --questions FILE.jsonl"),
        (["ask", "--question", " "], "error: an empty question: every --question and every line of --questions needs"),
        (["ask", "--question", "Q?", "--context-tokens", "8"], "error: --context-tokens needs --adapter: it takes"),
        (["ask", "--question", "Q?", "--sample", "conv-1"], "error: --sample applies to LoCoMo files given with"),
        (["ask", "--question", "Q?", "--context", "missing.txt"], "error: text file missing.txt not found"),
        (["chat", "--context", "a.txt", "--context-tokens", "3"], "not allowed with argument --context"),
    ],
)
def test_asking_errors_are_one_line_and_come_before_the_model_loads(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_LOCAS_CACHE", str(tmp_path / "no-cache"))  # no model: errors must come first
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status in (1, 2) and len(err) == 1 and message in err[0], err


def test_context_tokens_needs_a_recorded_text(run, tmp_path, capsys):
    adapter = tmp_path / "copied"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((run["adapter"] / name).read_bytes())
    assert cli.main(["ask", "--adapter", str(adapter), "--question", "Q?", "--context-tokens", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --context-tokens: ") and "memorize_results.json is missing or names no text" in err


def test_a_locomo_sample_is_memorised_by_id(tmp_path):
    model = make_checkpoint(tmp_path / "model")
    samples = []
    for n in (1, 2):
        turns = [
            {"speaker": "Ann" if k % 2 == 0 else "Bob", "dia_id": f"D1:{k + 1}", "text": " ".join(WORDS[k:] + WORDS)}
            for k in range(8)
        ]
        conversation = {"speaker_a": "Ann", "speaker_b": "Bob", "session_1": turns, "session_1_date_time": "May"}
        samples.append({"sample_id": f"conv-{n}", "conversation": conversation, "qa": []})
    data = tmp_path / "locomo.json"
    data.write_text(json.dumps(samples), encoding="utf-8")
    out = tmp_path / "adapter"
    done = peft_locas(
        "memorize", "--model", str(model), "--text", str(data), "--sample", "conv-2", "--out", str(out), *SMALL
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / cli.RESULTS_FILE).read_text())
    assert record["sample"] == "conv-2" and record["text"] == "locomo:conv-2"
    other = tmp_path / "other"
    done = peft_locas("memorize", "--model", str(model), "--text", str(data), "--sample", "conv-9", "--out", str(other))
    assert done.returncode == 1 and len(errors(done)) == 1, done.stderr
    assert errors(done)[0].startswith("error: ") and "conv-9" in errors(done)[0] and not other.exists()
