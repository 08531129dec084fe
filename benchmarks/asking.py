"""Asking many questions about one long context, side by side: ``model.generate`` on the whole prompt per question
(what a user writes without `Asker`), `Asker.ask` one question at a time after one prefill of the context, and
`Asker.ask_many` in one batch, with the context's keys and values kept once for the batch (the shared-prefix
attention of ``peft_locas.recall.attention``) and, as an ablation, copied to every row as before it.

The context is the first ``--tokens`` tokens of a prepared novel (a random-weight tiny model reads a repeated sentence);
``--questions`` questions about it, greedy answers of at most ``--new-tokens`` tokens. The methods alternate in
``--rounds`` interleaved rounds; each round's `Asker` is new, so its one prefill is timed (the ``prefill_s`` column,
shared by the three `Asker` methods) and each method's total is its questions' time plus that prefill (``generate``
prefills the whole prompt per question). Medians of wall and CPU time over rounds, the range of wall time, and each
total's ratio to ``generate``'s, computed round by round. Every method's answers must equal ``generate``'s (checked;
the batched ones up to float rounding, see `Asker.ask_many`).

    python benchmarks/asking.py [--quick] [--tokens 4096] [--questions 8] [--new-tokens 16] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from common import add_common_arguments, apply_common, book_token_ids, finish, load_model, set_work, start_clock

from peft_locas.recall import asking, attention
from peft_locas.recall.asking import Asker

QUESTIONS = [
    "Who is Emma's governess?",
    "Whom does Miss Taylor marry?",
    "Where does Emma live?",
    "What does Emma's father worry about?",
    "Who is Mr. Knightley?",
    "What does Emma plan for Harriet?",
    "Who is Harriet Smith?",
    "What happened at the wedding?",
    "Who visits Hartfield in the evening?",
    "What does Emma think of Mr. Elton?",
    "How old is Emma?",
    "Who is Isabella?",
    "What is Randalls?",
    "Who wrote the letter?",
    "What does Mr. Woodhouse eat?",
    "Why is Emma lonely?",
]
METHODS = ["generate", "ask", "ask_many", "ask_many (prefix copied)"]
COLUMNS = ["method", "prefill_s", "questions_s", "total_s", "cpu_s", "range_s", "vs_generate", "cpu_vs_generate"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="context tokens (default 4096, quick 256)")
    parser.add_argument("--questions", type=int, default=None, help="questions asked (default 8, quick 4)")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer length limit")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--work", default=None, help="where the tiny model is built (default under ~/.cache)")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (256 if args.quick else 4096)
    count = args.questions or (4 if args.quick else 8)
    if not 1 <= count <= len(QUESTIONS):
        parser.error(f"--questions must be between 1 and {len(QUESTIONS)}")
    rounds = args.rounds or (1 if args.quick else 3)
    apply_common(args)
    set_work(args, "asking")
    start_clock(args)
    model, tokenizer, context = load(args)
    questions = QUESTIONS[:count]

    samples: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
    prefills: list[tuple[float, float]] = []
    reference: list[str] = []
    for round_index in range(rounds):
        asker = Asker(model, tokenizer, context, max_new_tokens=args.new_tokens, max_context_tokens=args.tokens)
        prefills.append(timed(asker.prefill)[1])
        runs = methods(model, asker, questions, args.new_tokens)
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        for method in order:
            answers, seconds = timed(runs[method])
            samples[method].append(seconds)
            if method == "generate":
                reference = answers
            elif reference and answers != reference:
                raise SystemExit(f"error: {method}'s answers differ from generate's: {answers} vs {reference}")
            wall, cpu = seconds
            print(f"round {round_index + 1}/{rounds}, {method}: {wall:.2f} s (CPU {cpu:.2f} s)", flush=True)

    rows = summarise(samples, prefills)
    extra = {"tokens": args.tokens, "questions": questions, "new_tokens": args.new_tokens, "rounds": rounds}
    extra |= {"answers": reference, "prefill_rounds": prefills, "round_seconds": samples}
    return finish("asking", args, rows, COLUMNS, extra)


def methods(model: torch.nn.Module, asker: Asker, questions: list[str], new_tokens: int) -> dict[str, Callable]:
    """Each method's run over ``questions``, returning the answers' texts."""
    batch = len(questions)
    return {
        "generate": lambda: [generated(model, asker, question, new_tokens) for question in questions],
        "ask": lambda: [asker.ask(question).text for question in questions],
        "ask_many": lambda: [answer.text for answer in asker.ask_many(questions, batch_size=batch)],
        "ask_many (prefix copied)": lambda: copied(
            lambda: [answer.text for answer in asker.ask_many(questions, batch_size=batch)]
        ),
    }


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, object, str]:
    """The model, its tokenizer and the context text: a prepared novel's first ``--tokens`` tokens (Emma), or for
    ``--model tiny`` LoCoMo benchmark's tiny model with a tokenizer and a repeated sentence."""
    if args.model == "tiny":
        from locomo import tiny_folder
        from transformers import AutoTokenizer

        folder = tiny_folder(Path(args.work))
        model, _ = load_model(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model, tokenizer, "Alice followed the white rabbit down the hole. " * args.tokens
    model, tokenizer = load_model(args.model)
    return model, tokenizer, tokenizer.decode(book_token_ids(tokenizer, "emma", args.tokens))


def generated(model: torch.nn.Module, asker: Asker, question: str, new_tokens: int) -> str:
    """``model.generate`` on the whole prompt (the context prefilled again), greedy, decoded as `Asker` does."""
    ids = asker.prompt_ids(question).to(asking.model_device(model))
    eos = asker.eos_token_ids
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else None,
        )
    new = [token for token in output[0, ids.shape[1] :].tolist() if token not in eos]
    return asker.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def copied(run: Callable[[], list[str]]) -> list[str]:
    """``run`` with the prefix copied to every row of a batch and transformers' own sdpa attention (the asking path
    before the shared-prefix attention)."""
    with mock.patch.object(asking, "shares_prefix", lambda model: False):
        with mock.patch.object(attention, "shares_prefix", lambda model: False):
            return run()


def timed(function: Callable[[], object]) -> tuple[object, tuple[float, float]]:
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, (time.perf_counter() - start, time.process_time() - cpu)


def summarise(samples: dict[str, list[tuple[float, float]]], prefills: list[tuple[float, float]]) -> list[dict]:
    """One row per method: medians over rounds; `Asker` methods' totals include their round's prefill."""
    totals = {
        method: [
            (wall + (prefill[0] if method != "generate" else 0.0), cpu + (prefill[1] if method != "generate" else 0.0))
            for (wall, cpu), prefill in zip(runs, prefills, strict=True)
        ]
        for method, runs in samples.items()
    }
    rows = []
    for method in METHODS:
        walls = [wall for wall, _ in totals[method]]
        rows.append(
            {
                "method": method,
                "prefill_s": None if method == "generate" else statistics.median(w for w, _ in prefills),
                "questions_s": statistics.median(w for w, _ in samples[method]),
                "total_s": statistics.median(walls),
                "cpu_s": statistics.median(c for _, c in totals[method]),
                "range_s": max(walls) - min(walls),
                "vs_generate": statistics.median(
                    a[0] / b[0] for a, b in zip(totals[method], totals["generate"], strict=True)
                ),
                "cpu_vs_generate": statistics.median(
                    a[1] / b[1] for a, b in zip(totals[method], totals["generate"], strict=True)
                ),
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
