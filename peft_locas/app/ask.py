"""``peft-locas ask``: answer questions with a memorised model, one JSON line per answer, in the questions' order.

Questions are answered in batches (`Asker.ask_many`: one forward per token for the whole batch, over copies of the
prefilled context); each answer is the one `Asker.ask` gives the question alone. Lines go to stdout as each batch is
done, or all at once to ``--out``, written atomically."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .context import add_asking_options, check_context, context_text, load_asker, memory_instruction_of
from .inputs import adapter_config, memories_in, shared_base
from .options import UsageError, positive_int


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ask", help="ask a memorised model questions (greedy answers as JSON lines)")
    add_asking_options(parser)
    parser.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    parser.add_argument(
        "--questions",
        type=Path,
        default=None,
        help='JSONL, one {"question": ..., optional "answer", "category"} per line, or a LoCoMo .json (its qa)',
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="questions answered together (same answers as one by one; each holds a copy of the context's KV cache)",
    )
    parser.add_argument(
        "--memory",
        action="append",
        type=Path,
        default=None,
        help="instead of --adapter: ask every question of each of these memories (repeatable; a folder of memories, "
        "as memorize --separate writes, gives all of them), served together from one base model; each line names "
        "its memory",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON lines here instead of stdout")
    parser.add_argument(
        "--show-prompt",
        action="store_true",
        help="add each question's whole prompt (system prompt, context, instruction, chat template) to its line, "
        'as "prompt"',
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..recall.dialogue import DialogueError, Question, read_questions

    questions = [Question(question=text) for text in args.question]
    if args.questions is not None:
        try:
            questions += read_questions(args.questions, args.sample)
        except DialogueError as exc:
            raise UsageError(str(exc)) from exc
    if not questions:
        raise UsageError("no question: pass --question TEXT (repeatable) or --questions FILE.jsonl")
    if any(not q.question.strip() for q in questions):
        raise UsageError("an empty question: every --question and every line of --questions needs text")
    if args.out is not None and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder: give a file path for the JSON lines")
    if args.memory is None:
        asker, memories = load_asker(args), [None]
    else:
        asker, memories = load_memories(args)
    rows = [(memory, question) for question in questions for memory in memories]

    from ..recall.metrics import locomo_f1, token_f1

    lines = []
    for first in range(0, len(rows), args.batch_size):  # one batch at a time: stdout shows progress
        batch = rows[first : first + args.batch_size]
        answers = _answers(asker, batch, args.batch_size)
        for (memory, question), answer in zip(batch, answers, strict=True):
            line = {"question": question.question, "answer": answer.text}
            if memory is not None:
                line["memory"] = str(args.memory[memory])
            if question.category is not None:
                line["category"] = question.category
            gold = question.answer
            if gold is not None or question.category == 5:
                # LoCoMo's adversarial questions (5) have no gold answer: the right one says it is not mentioned;
                # their tempting wrong answer is kept apart so that nobody reads it as the gold one
                line["gold"] = gold
                if "adversarial_answer" in question.extra:
                    line["adversarial_answer"] = question.extra["adversarial_answer"]
                line["f1"] = (
                    locomo_f1(answer.text, gold, question.category)
                    if question.category is not None
                    else token_f1(answer.text, str(gold))
                )
            seconds = round(answer.seconds, 3)
            line.update(prompt_tokens=answer.prompt_tokens, new_tokens=answer.new_tokens, seconds=seconds)
            if args.show_prompt:
                line["prompt"] = asker.prompt(question.question)
            lines.append(json.dumps(line, ensure_ascii=False))
            if args.out is None:
                print(lines[-1], flush=True)
    if args.out is not None:
        _write_atomic(args.out, "".join(f"{line}\n" for line in lines))
        print(f"{len(lines)} answers: {args.out}", file=sys.stderr)
    return 0


def load_memories(args: argparse.Namespace):
    """The base model with every ``--memory`` loaded (adapters ``memory_0``, ``memory_1``, ...) and its `Asker`."""
    if args.adapter is not None:
        raise UsageError("--memory and --adapter exclude each other: give every memory with --memory")
    if args.context_tokens is not None:
        raise UsageError(
            "--context-tokens takes the end of the text one adapter memorised, with --adapter: with --memory give a "
            "shared --context FILE, or ask each memory with --adapter DIR --context-tokens N"
        )
    check_context(args)
    given = [(inside, memory) for memory in args.memory for inside in (memories_in(memory) or [memory])]
    seen: dict[Path, Path] = {}
    for memory, spec in given:
        if (first := seen.get(memory.resolve())) is not None:
            how = "" if spec == memory == first else f" (from --memory {first} and --memory {spec})"
            raise UsageError(f"--memory gives {memory} twice{how}: give each memory once")
        seen[memory.resolve()] = spec
    args.memory = [memory for memory, _ in given]
    for memory in args.memory:
        adapter_config(memory)
    folder = shared_base(args.model, args.memory)

    from ..recall.asking import Asker, max_positions
    from .loading import load, load_adapters

    model, tokenizer, _ = load(folder, args)
    model = load_adapters(model, args.memory, [f"memory_{index}" for index in range(len(args.memory))])
    context = context_text(args, tokenizer, max_positions(model))
    asker = Asker(
        model,
        tokenizer,
        context,
        instruction=memory_instruction_of(args.memory) if context is None else None,
        system_prompt=args.system,
        use_chat_template=False if args.no_chat_template else None,
        max_new_tokens=args.max_new_tokens,
    )
    return asker, list(range(len(args.memory)))


def _answers(asker, batch: list, batch_size: int) -> list:
    """One batch's answers: `Asker.ask_many` with one model, `ask_memories` when rows name memories."""
    if batch[0][0] is None:
        return asker.ask_many([question.question for _, question in batch], batch_size=batch_size)
    from ..recall.serving import ask_memories

    requests = [(f"memory_{memory}", question.question) for memory, question in batch]
    return ask_memories(asker, requests, batch_size=batch_size)


def _write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it: a failure leaves the old file or none, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
