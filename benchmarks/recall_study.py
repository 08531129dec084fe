"""Which memorisation settings make a memory *answer questions* about what it read (issue: defaults that recall).

The instrument is the recall probe (`recall_probe.py`): a generated conversation full of invented facts, and one
question per fact. Every setting memorises the same conversation into a fresh memory; every question is then asked
with **no dialogue in the prompt**, and the gold answer's mean log-likelihood per token (teacher-forced, natural log)
is compared with the base model's on the same question: the paired difference (mean and standard error over the
questions) and the share of questions whose gold answer became more likely. The control asks whether that gain is
*specific*: the same question scored with another fact's answer (the next question's, cyclically), whose gain is
subtracted per question (``specific_gain``); a memory that only makes the text's names and numbers likelier raises
both alike. Prequential perplexity of the dialogue is
reported beside it, because the two can move apart (a memory can absorb a text's style without its facts).

    python benchmarks/recall_study.py --settings ntp,distill --facts 20 --tokens 4000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import add_common_arguments, apply_common, print_table, write_results
from recall_probe import generate_probe

from peft_locas import LocasConfig, MemorizeConfig, memorize
from peft_locas.engine.memorization import templora_config
from peft_locas.recall import Asker, load_conversation
from peft_locas.recall.metrics import mean_with_stderr

#: name -> (adapter, MemorizeConfig overrides); the first is today's default
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ntp": ("locas", {}),
    "ntp_6steps": ("locas", {"steps_per_chunk": 6}),
    "ntp_lr2e-2": ("locas", {"lr": 2e-2}),
    "distill": ("locas", {"objective": "distill"}),
    "distill_6steps": ("locas", {"objective": "distill", "steps_per_chunk": 6}),
    "distill_ntp": ("locas", {"objective": "distill", "ntp_weight": 1.0}),
    "lora": ("lora", {"lr": 1e-3}),
    "self_study_8": ("locas", {"self_study_questions": 8}),
    "self_study_8_distill": ("locas", {"objective": "distill", "self_study_questions": 8}),
}


COLUMNS = [
    "setting",
    "perplexity",
    "paired_gain",
    "paired_gain_stderr",
    "share_up",
    "other_answer_gain",
    "specific_gain",
    "specific_gain_stderr",
    "seconds",
]


def gold_logprobs(asker: Asker, questions: list[Any], shift: int = 0) -> list[float]:
    """Mean log-likelihood per token of each gold answer after its question; with ``shift`` k, of the answer of the
    question k places later (cyclically): the control, an answer the text holds but not to this question."""
    values = []
    for index, question in enumerate(questions):
        answer = questions[(index + shift) % len(questions)].answer
        total, count = asker.answer_logprob(question.question, str(answer))
        values.append(total / count)
    return values


def run_setting(name: str, base, tokenizer, conversation, args: argparse.Namespace) -> dict[str, Any]:
    adapter, overrides = SETTINGS[name]
    config = MemorizeConfig(chunk_tokens=args.chunk, context_tokens=args.context, seed=args.seed, **overrides)
    peft_config = LocasConfig(r=args.r) if adapter == "locas" else templora_config(args.r)
    start, cpu = time.perf_counter(), time.process_time()
    result = memorize(copy.deepcopy(base), tokenizer, conversation, config, peft_config=peft_config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    asker = Asker(result.model, tokenizer)
    memory, memory_other = gold_logprobs(asker, conversation.questions), gold_logprobs(asker, conversation.questions, 1)
    with result.model.disable_adapter():
        bare, bare_other = gold_logprobs(asker, conversation.questions), gold_logprobs(asker, conversation.questions, 1)
    diffs = [m - b for m, b in zip(memory, bare, strict=True)]
    mean, stderr = mean_with_stderr(diffs)
    # the control: does the memory raise the right answer more than another fact's answer to the same question?
    other = [m - b for m, b in zip(memory_other, bare_other, strict=True)]
    specific = [d - o for d, o in zip(diffs, other, strict=True)]
    other_mean, other_stderr = mean_with_stderr(other)
    specific_mean, specific_stderr = mean_with_stderr(specific)
    return {
        "setting": name,
        "adapter": adapter,
        "overrides": overrides,
        "perplexity": result.perplexity,
        "gold_logprob_base": sum(bare) / len(bare),
        "gold_logprob_memory": sum(memory) / len(memory),
        "paired_gain": mean,
        "paired_gain_stderr": stderr,
        "share_up": sum(d > 0 for d in diffs) / len(diffs),
        "other_answer_gain": other_mean,
        "other_answer_gain_stderr": other_stderr,
        "specific_gain": specific_mean,
        "specific_gain_stderr": specific_stderr,
        "share_specific": sum(d > 0 for d in specific) / len(specific),
        "per_question": diffs,
        "per_question_other": other,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=4000, help="probe length (approximate tokens)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--r", type=int, default=64)
    args = parser.parse_args(argv)
    apply_common(args)
    from common import load_model

    base, tokenizer = load_model(args.model)
    probe = Path(tempfile.mkdtemp(prefix="recall_study_")) / "probe.json"
    count = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else None
    probe.write_text(json.dumps(generate_probe(args.facts, args.tokens, args.seed, count)), encoding="utf-8")
    conversation = load_conversation(probe)
    rows = []
    for name in args.settings.split(","):
        torch.manual_seed(args.seed)
        rows.append(run_setting(name, base, tokenizer, conversation, args))
        print_table(rows[-1:], COLUMNS)
    print_table(rows, COLUMNS)
    path = write_results("recall_study", args, {"rows": rows, "questions": len(conversation.questions)})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
