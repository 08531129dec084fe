"""Conversations and questions through the command line, in fresh processes and in this one: memorise a dialogue,
then `ask` (in batches, as one by one) and `chat` it, with a context fitted to the model, exact outputs and one-line
errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from peft import PeftModel
from tiny_checkpoint import make_checkpoint, stopping_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import cli
from peft_locas.app.context import QUESTION_ROOM
from peft_locas.app.inputs import read_source
from peft_locas.recall.asking import Asker, fit_context
from peft_locas.recall.metrics import locomo_f1

SMALL = ["--chunk-tokens", "64", "--context-tokens", "16", "--r", "8", "--steps-per-chunk", "1", "--lr", "1e-2"]
WORDS = "the cat sat on a mat and the dog ran to see what the bird had said about it".split()


def peft_locas(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "peft_locas", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, input=stdin)


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if not line.startswith(("Loading weights", "Failed to load CPU"))]


def ask_here(capsys, *args: str) -> tuple[list[dict], list[str]]:
    """``peft-locas ask`` in this process: its JSON lines, and its ``context:`` lines on stderr."""
    assert cli.main(["ask", *args]) == 0, capsys.readouterr().err[-3000:]
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("context:")]
    return [json.loads(line) for line in captured.out.splitlines()], notes


def memorised(run):
    """The memorised model (base and adapter, as ``ask`` loads them) and its tokenizer."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["model"]), run["adapter"])
    return model, AutoTokenizer.from_pretrained(run["model"])


def answering_checkpoint(folder: os.PathLike) -> os.PathLike:
    """`stopping_llama` saved with its tokenizer: greedy answers that depend on the question and end at different
    steps."""
    tokenizer = tiny_tokenizer()
    stopping_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_positions(model: os.PathLike, folder: os.PathLike, positions: int) -> str:
    """A copy of a model folder whose config gives the model ``positions`` positions (the same weights: an adapter
    made on the original fits it, and rotary positions below ``positions`` compute the same)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return str(folder)


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
    rows.append({"question": "What did the dog paint?", "category": 5, "adversarial_answer": "a sunrise"})
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = ["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--max-new-tokens", "6"]
    done = peft_locas("ask", *args, "--question", "Where is the dog?", "--questions", str(questions))
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["Where is the dog?", *(row["question"] for row in rows)]
    assert answers[1]["gold"] == "the cat" and answers[1]["category"] == 4 and 0 <= answers[1]["f1"] <= 1
    assert "gold" not in answers[0] and all(1 <= a["new_tokens"] <= 6 for a in answers)
    # an adversarial question: no gold answer, its tempting wrong one under its own name, scored by LoCoMo's rule
    adversarial = answers[3]
    assert adversarial["gold"] is None and adversarial["adversarial_answer"] == "a sunrise"
    assert adversarial["f1"] == locomo_f1(adversarial["answer"], None, 5)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["model"]), run["adapter"])
    asker = Asker(model, AutoTokenizer.from_pretrained(run["model"]), max_new_tokens=6)
    assert [a["answer"] for a in answers] == [asker.ask(a["question"]).text for a in answers]

    # --out: the same lines in a file, nothing on stdout; --context-tokens: the memorised text's end before each one
    out = tmp_path / "answers.jsonl"
    done = peft_locas("ask", *args, "--question", "Where is the dog?", "--context-tokens", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and f"1 answers: {out}" in done.stderr
    with_context = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(run["model"])
    recent = fit_context(tokenizer, read_source(str(run["conversation"])).text, 40)
    expected = Asker(model, tokenizer, recent, max_new_tokens=6).ask("Where is the dog?")
    assert (with_context["answer"], with_context["prompt_tokens"]) == (expected.text, expected.prompt_tokens)
    assert with_context["prompt_tokens"] >= answers[0]["prompt_tokens"] + 30


def test_ask_answers_in_batches_as_one_by_one(tmp_path, capsys, monkeypatch):
    """``--batch-size 2`` answers five questions of different lengths in batches of 2, 2 and 1 rows, in their order,
    each exactly as `Asker.ask` answers it alone (different answers, ending at different steps); the default batch is
    8, as --help says."""
    folder = answering_checkpoint(tmp_path / "model")
    questions = [
        "Who sat on the mat?",
        "What ran?",
        "What did the bird say about the cat and the dog when they ran to see it?",
        "Why?",
        "Where did the dog run to see what the bird had said?",
    ]
    rows = []
    generate_many = Asker._generate_many

    def counted(self, continuations, limits, prefilled):
        rows.append(len(continuations))
        return generate_many(self, continuations, limits, prefilled)

    monkeypatch.setattr(Asker, "_generate_many", counted)
    args = ["--model", str(folder), "--max-new-tokens", "12", *(a for q in questions for a in ("--question", q))]
    answers, notes = ask_here(capsys, *args, "--batch-size", "2")
    assert rows == [2, 2, 1] and notes == []
    assert [a["question"] for a in answers] == questions

    asker = Asker(
        AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_new_tokens=12
    )
    alone = [asker.ask(question) for question in questions]
    assert [(a["answer"], a["prompt_tokens"], a["new_tokens"]) for a in answers] == [
        (a.text, a.prompt_tokens, a.new_tokens) for a in alone
    ]
    # the fixture is what the test needs: questions of different lengths, mostly different answers (a mixed-up order
    # would show), some ending at an end-of-sequence token before the limit
    assert len({a.prompt_tokens for a in alone}) == len(questions) and len({a.text for a in alone}) >= 4
    assert len({a.new_tokens for a in alone}) >= 2

    rows.clear()
    assert [a["answer"] for a in ask_here(capsys, *args)[0]] == [a.text for a in alone] and rows == [5]
    with pytest.raises(SystemExit):
        cli.main(["ask", "--help"])
    assert "(default: 8)" in capsys.readouterr().out.split("--batch-size")[-1].split("--out")[0]  # its help entry


def test_a_context_longer_than_the_model_keeps_its_end_and_says_so(run, tmp_path, capsys):
    """``--context FILE`` and ``--context-tokens N`` go through `fit_context`: the end of the text, from a line start,
    in at most N tokens and the model's positions less the answer's and `QUESTION_ROOM`; stderr names the tokens
    kept of how many, and the answers are the `Asker`'s with that context."""
    positions, answer = 400, 6
    room = positions - answer - QUESTION_ROOM
    model_limit = f"the model's {positions} positions less {answer} for the answer, {QUESTION_ROOM} for the question"
    model_dir = with_positions(run["model"], tmp_path / "short-model", positions)
    model, tokenizer = memorised(run)
    # short lines: the cut finds a line start within the first 10% of what it keeps
    lines = [
        f"{('Ann', 'Bob')[k % 2]}: " + " ".join(WORDS[(3 * k + i) % len(WORDS)] for i in range(3)) for k in range(80)
    ]
    text = "\n".join(lines) + "\n"
    long_file = tmp_path / "long.txt"
    long_file.write_text(text, encoding="utf-8")
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert total > 2 * room

    args = ["--model", model_dir, "--adapter", str(run["adapter"]), "--max-new-tokens", str(answer)]
    question = ["--question", "Who sat on the mat?"]
    answers, notes = ask_here(capsys, *args, *question, "--context", str(long_file))
    kept = fit_context(tokenizer, text, room)
    count = len(tokenizer(kept, add_special_tokens=False)["input_ids"])
    # the end of the text from a line start, within one line's tokens of the budget
    assert text.endswith(kept) and text[-len(kept) - 1] == "\n" and room - 20 < count <= room
    assert notes == [
        f"context: kept the last {count} of {total} tokens of {long_file}, from a line start ({model_limit})"
    ]
    expected = Asker(model, tokenizer, kept, max_new_tokens=answer).ask("Who sat on the mat?")
    assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)

    # --context-tokens: the memorised text's end, within N tokens or the model's room, whichever is smaller
    memorised_text = read_source(str(run["conversation"])).text
    total = len(tokenizer(memorised_text, add_special_tokens=False)["input_ids"])
    for wanted, budget, why in [(30, 30, "--context-tokens 30"), (500, room, model_limit)]:
        answers, notes = ask_here(capsys, *args, *question, "--context-tokens", str(wanted))
        kept = fit_context(tokenizer, memorised_text, budget)
        count = len(tokenizer(kept, add_special_tokens=False)["input_ids"])
        assert memorised_text.endswith(kept) and budget - 5 <= count <= budget
        start = ", from a line start" if memorised_text[-len(kept) - 1] == "\n" else ""
        assert notes == [f"context: kept the last {count} of {total} tokens of the memorised text{start} ({why})"]
        expected = Asker(model, tokenizer, kept, max_new_tokens=answer).ask("Who sat on the mat?")
        assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)

    # a memorised text that fits is put whole, silently; an answer that leaves no room is refused in one line
    full_model = ["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--max-new-tokens", str(answer)]
    answers, notes = ask_here(capsys, *full_model, *question, "--context-tokens", str(total + 50))
    expected = Asker(model, tokenizer, memorised_text, max_new_tokens=answer).ask("Who sat on the mat?")
    assert notes == [] and answers[0]["prompt_tokens"] == expected.prompt_tokens
    status = cli.main(["ask", *args, *question, "--context-tokens", "30", "--max-new-tokens", "150"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 1 and err == [
        f"error: the model's {positions} positions leave no room for a context beside 150 for the answer and "
        f"{QUESTION_ROOM} for the question: lower --max-new-tokens, or ask without a context"
    ]


def test_context_tokens_take_the_end_of_what_was_memorised(run, tmp_path, capsys):
    """An adapter that memorised the text's first 100 tokens (``--max-tokens 100``) is asked with the end of those
    100 tokens, not of the whole text."""
    adapter = tmp_path / "first-100"
    shutil.copytree(run["adapter"], adapter)
    record = json.loads((adapter / cli.RESULTS_FILE).read_text())
    record["settings"]["max_tokens"] = 100
    (adapter / cli.RESULTS_FILE).write_text(json.dumps(record))
    model, tokenizer = memorised(run)
    text = read_source(str(run["conversation"])).text
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert len(encoded["input_ids"]) > 150
    first = text[: encoded["offset_mapping"][99][1]]
    assert tokenizer(first)["input_ids"] == encoded["input_ids"][:100]

    args = ["--model", str(run["model"]), "--adapter", str(adapter), "--max-new-tokens", "6"]
    answers, notes = ask_here(capsys, *args, "--question", "What ran?", "--context-tokens", "30")
    kept = fit_context(tokenizer, first, 30)
    assert first.endswith(kept) and not text.endswith(kept)
    count = len(tokenizer(kept, add_special_tokens=False)["input_ids"])
    total = len(tokenizer(first, add_special_tokens=False)["input_ids"])
    start = ", from a line start" if first[-len(kept) - 1] == "\n" else ""
    assert notes == [
        f"context: kept the last {count} of {total} tokens of the memorised text{start} (--context-tokens 30)"
    ]
    expected = Asker(model, tokenizer, kept, max_new_tokens=6).ask("What ran?")
    assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)


def test_a_memorised_text_is_asked_about_the_text_it_remembers(run, tmp_path, capsys):
    """Without a context, ``ask`` words its instruction for what the adapter memorised (its record's text paths): a
    conversation file keeps LoCoMo's "conversation you remember", a plain text gets "the text you remember", and
    ``--memory`` with any plain-text memory among them does too."""
    from peft_locas.recall.asking import MEMORY_INSTRUCTION, TEXT_MEMORY_INSTRUCTION

    book = tmp_path / "book"
    shutil.copytree(run["adapter"], book)
    record = json.loads((book / cli.RESULTS_FILE).read_text())
    story = tmp_path / "story.txt"
    story.write_text(read_source(str(run["conversation"])).text, encoding="utf-8")
    texts = [{**text, "text_path": str(story)} for text in record["texts"]]
    (book / cli.RESULTS_FILE).write_text(json.dumps({**record, "text_path": str(story), "texts": texts}))
    model, tokenizer = memorised(run)
    question = ["--question", "What ran?", "--max-new-tokens", "6"]
    for adapter, instruction in ((run["adapter"], MEMORY_INSTRUCTION), (book, TEXT_MEMORY_INSTRUCTION)):
        answers, _ = ask_here(capsys, "--model", str(run["model"]), "--adapter", str(adapter), *question)
        asker = Asker(model, tokenizer, instruction=instruction, max_new_tokens=6)
        expected = asker.ask("What ran?")
        assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)
        assert "prompt" not in answers[0]
        shown, _ = ask_here(capsys, "--model", str(run["model"]), "--adapter", str(adapter), *question, "--show-prompt")
        assert shown[0]["prompt"] == asker.prompt("What ran?") and instruction in shown[0]["prompt"]
    conversation_only = len(tokenizer(MEMORY_INSTRUCTION)["input_ids"])
    assert conversation_only != len(tokenizer(TEXT_MEMORY_INSTRUCTION)["input_ids"])  # the prompts tell them apart
    both = ["--memory", str(run["adapter"]), "--memory", str(book)]
    answers, _ = ask_here(capsys, "--model", str(run["model"]), *both, *question)
    assert {answer["prompt_tokens"] for answer in answers} == {expected.prompt_tokens}

    # merged, the checkpoint keeps the record (and the wording); a composed memory follows the ones it came from
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(run["model"]), "--adapter", str(book), "--out", str(merged)]) == 0
    assert json.loads((merged / cli.RESULTS_FILE).read_text())["merged_from"] == str(book.resolve())
    capsys.readouterr()
    answers, _ = ask_here(capsys, "--model", str(merged), *question)
    base = AutoModelForCausalLM.from_pretrained(merged)
    expected = Asker(base, tokenizer, instruction=TEXT_MEMORY_INSTRUCTION, max_new_tokens=6).ask("What ran?")
    assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)
    # --context-tokens reads the merged checkpoint's record as it reads an adapter's
    answers, notes = ask_here(capsys, "--model", str(merged), *question, "--context-tokens", "30")
    kept = fit_context(tokenizer, story.read_text(encoding="utf-8"), 30)
    expected = Asker(base, tokenizer, kept, max_new_tokens=6).ask("What ran?")
    assert (answers[0]["answer"], answers[0]["prompt_tokens"]) == (expected.text, expected.prompt_tokens)
    assert len(notes) == 1 and notes[0].startswith("context: kept the last ")
    composed = tmp_path / "composed"
    compose = ["compose", "--model", str(run["model"]), "--adapter", str(run["adapter"]), "--adapter", str(book)]
    assert cli.main([*compose, "--out", str(composed)]) == 0
    capsys.readouterr()
    from peft_locas.app.context import memory_instruction_of

    assert memory_instruction_of([composed]) == TEXT_MEMORY_INSTRUCTION
    assert memory_instruction_of([run["adapter"], run["model"]]) == MEMORY_INSTRUCTION


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
        (["ask", "--question", "Q?", "--context-tokens", "8"], "error: --context-tokens needs --adapter, or a merged"),
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
