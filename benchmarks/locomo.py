"""LoCoMo long-dialogue QA: what a model answers about a conversation longer than its window, with a Locas memory of
the conversation, a TempLoRA-style LoRA memory, or none, and with a long, a short or no window on the dialogue.

Data: LoCoMo (Maharana et al., ACL 2024; ``locomo10.json`` of snap-research/LoCoMo, CC BY-NC 4.0, read from
``--data``, never copied), 10 conversations of 13K to 26K SmolLM2 tokens, longer than the model's 8,192 positions;
and, with ``--probe`` (or a ``--data`` file written by ``recall_probe.py``), a generated conversation of invented
facts no model can know. Every conversation is rendered once (`peft_locas.recall.dialogue.render_conversation`) and
that text is both memorised and shown.

Memories, each written by `peft_locas.memorize()` over the whole conversation in its own process (chunks of
``--chunk`` tokens starting at turn starts, ``--context`` tokens of prefix, ``--steps`` steps per chunk; book_ppl's
short window): ``locas_ntp`` (Locas r=64, top_k initialisation, next-token prediction), ``locas_distill`` (the same
trained by self-distillation from the base model reading a long window), ``lora`` (LoRA r=64 on all linear layers,
TempLoRA's recipe, at the learning rate book_ppl.py's sweep chose).

Settings, each answering every selected question (greedy, ``--answer-tokens``): ``long`` (the end of the dialogue that
fits the model with the prompt), ``short`` (its last ``--short-tokens``), ``none`` (no dialogue: the paper's "No Cxt"),
each alone (base model) and with every memory (``short+locas_ntp`` ...). A window starts at a turn start and keeps the
header of the session it starts in, so the date is known. Prompts follow LoCoMo's (temporal questions get its date
hint; adversarial ones its two options, "Not mentioned in the conversation" or the tempting wrong answer, in seeded
order). Scores per question: LoCoMo's F1 (`peft_locas.recall.metrics.locomo_f1`; adversarial: 1 when the answer says
"not mentioned" / "no information available") and the gold answer's mean log-likelihood per token (adversarial gold:
"Not mentioned in the conversation."). Aggregates: per category and overall, with standard errors, also over the
questions whose evidence turns all lie outside the window in use, and paired differences between settings.

Resumable: memories and per-setting answers (JSONL) live in ``--work``; a rerun reuses what is finished, continues
what is not, and aggregates everything found.

    python benchmarks/locomo.py [--quick] [--samples 3] [--probe] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from book_ppl import swept_lora_lr
from common import (
    add_common_arguments,
    apply_common,
    figure_path,
    load_model,
    print_table,
    set_work,
    write_results,
)
from locomo_dialogues import (
    ADVERSARIAL_GOLD,
    Dialogue,
    View,
    adversarial_prediction,
    answerable,
    first_sessions,
    question_prompt,
    stratified,
    view,
)
from locomo_scores import aggregate, category_rows, paired_rows, plot, table_rows
from recall_probe import write_probe

from peft_locas.recall.dialogue import load_conversation, render_conversation
from peft_locas.recall.metrics import CATEGORIES, locomo_f1

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10.json"
#: memory name -> memorize()'s training objective
MEMORIES = {"locas_ntp": "ntp", "locas_distill": "distill", "lora": "ntp"}
WINDOWS = ("none", "short", "long")
#: positions left for the prompt around the dialogue (instruction, chat template, question) and the answer
PROMPT_RESERVE = 256

QUICK_HELP = (
    "quick mode: the first conversation only (or --samples), of it the first sessions that fit in --quick-tokens "
    "(default 4096) tokens, memorised and shown as if that were the whole conversation; about --questions (default "
    "40) of its questions whose evidence lies in those sessions, drawn stratified over categories with --seed; with "
    "--probe, a probe of 16 facts in about 3,000 tokens"
)


# ---------------------------------------------------------------------------------------------------- conversations
def sample_ids(path: Path) -> list[tuple[str, bool]]:
    """``(sample id, written by recall_probe.py)`` of every sample in a LoCoMo-layout JSON file."""
    if not path.is_file():
        raise SystemExit(
            f"error: no LoCoMo data at {path}; pass --data with the path of locomo10.json (snap-research/LoCoMo) or "
            "of a file written by benchmarks/recall_probe.py"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    samples = data if isinstance(data, list) else [data]
    return [(str(sample.get("sample_id", index)), "generator" in sample) for index, sample in enumerate(samples)]


def pick_samples(value: str | None, available: list[str], quick: bool) -> list[str]:
    """``--samples``: comma-separated ids, or a count of the first ones; default all (quick: the first)."""
    if value is None:
        return available[:1] if quick else available
    if value.isdigit():
        return available[: int(value)]
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [sample for sample in wanted if sample not in available]
    if unknown:
        raise SystemExit(f"error: --samples names {', '.join(unknown)}, not in the data; available: {available}")
    return wanted


def dialogues(args: argparse.Namespace, tokenizer, count) -> list[Dialogue]:
    """The conversations of this run, each cut (quick) and with its questions selected."""
    sources = [(args.data, sample, probe) for sample, probe in _chosen(args)]
    if args.probe:
        probe = probe_file(args, count)
        sources += [(probe, sample, True) for sample, _ in sample_ids(probe)]
    result = []
    for path, sample, probe in sources:
        conversation = load_conversation(path, sample)
        total = len(conversation.sessions)
        if args.quick:
            conversation = first_sessions(conversation, args.quick_tokens, count)
        dialogue = Dialogue.build(sample, "probe" if probe else "locomo", str(path), conversation, total, tokenizer)
        eligible = [(i, q) for i, q in enumerate(conversation.questions) if answerable(q)]
        if args.quick:  # only questions the kept sessions can answer
            eligible = [(i, q) for i, q in eligible if dialogue.evidence_units(q) is not None]
        limit = args.questions if args.questions is not None else (40 if args.quick else None)
        dialogue.questions = stratified(eligible, limit, args.seed) if limit is not None else eligible
        if not dialogue.questions:
            raise SystemExit(f"error: {sample} in {path} has no question to ask; raise --quick-tokens or check --data")
        result.append(dialogue)
    return result


def _chosen(args: argparse.Namespace) -> list[tuple[str, bool]]:
    if args.data is None:
        return []
    samples = dict(sample_ids(args.data))
    return [(sample, samples[sample]) for sample in pick_samples(args.samples, list(samples), args.quick)]


def probe_file(args: argparse.Namespace, count) -> Path:
    """The recall probe for this run, generated into ``--work`` once (its name holds its sizes and seed)."""
    facts = args.probe_facts or (16 if args.quick else 40)
    tokens = args.probe_tokens or (3000 if args.quick else 12_000)
    path = Path(args.work) / "probe" / f"probe_f{facts}_t{tokens}_s{args.seed}.json"
    if not path.exists():
        write_probe(path.with_suffix(".tmp"), facts=facts, tokens=tokens, seed=args.seed, count_tokens=count)
        os.replace(path.with_suffix(".tmp"), path)
    return path


def answer_questions(asker, dialogue: Dialogue, shown: View, todo, args, out, batch_size: int = 8) -> int:
    """Ask ``todo`` questions in batches of ``batch_size`` that share the prefilled window (`Asker.ask_many`, then
    `Asker.answer_logprobs` for the gold answers), appending one JSON line per answer to ``out`` as each batch is done
    (flushed: a kill loses at most one batch). A record's ``wall_s`` and ``cpu_s`` are its batch's shared equally."""
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        wall, cpu = time.perf_counter(), time.process_time()
        prompts = [question_prompt(question, index, args.seed) for index, question in batch]
        golds = [ADVERSARIAL_GOLD if question.category == 5 else str(question.answer) for _, question in batch]
        texts = [text for text, _ in prompts]
        answers = asker.ask_many(texts, batch_size=batch_size)
        scores = asker.answer_logprobs(list(zip(texts, golds, strict=True)), batch_size=batch_size)
        wall, cpu = (time.perf_counter() - wall) / len(batch), (time.process_time() - cpu) / len(batch)
        for (index, question), (_, options), gold, answer, (logprob, tokens) in zip(
            batch, prompts, golds, answers, scores, strict=True
        ):
            prediction = adversarial_prediction(answer.text, options) if options else answer.text
            record = {
                "key": index,
                "question": question.question,
                "category": question.category,
                "gold": gold,
                "prediction": prediction,
                "raw": answer.text,
                "f1": locomo_f1(prediction, question.answer, question.category),
                "logprob": logprob,
                "gold_tokens": tokens,
                "loglik": logprob / tokens,
                "outside": shown.outside(dialogue, question),
                "wall_s": wall,
                "cpu_s": cpu,
            }
            out.write(json.dumps(record) + "\n")
        out.flush()
    return len(todo)


# ---------------------------------------------------------------------------------------------------- resumable files
def read_answers(path: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The answers a setting's JSONL file holds under the same ``header``; the file is rewritten without a torn last
    line, and discarded when its header differs (other settings)."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    records, intact = {}, True
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        first = None
    if first != {"header": header}:
        print(f"{path.name}: other settings; discarding its answers", flush=True)
        path.unlink()
        return {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write
            intact = False
            continue
        records[record["key"]] = record
    if not intact:
        path.write_text("".join(json.dumps(item) + "\n" for item in [{"header": header}, *records.values()]))
    return records


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- memories
def memory_protocol(args: argparse.Namespace, memory: str, dialogue_sha: str) -> dict[str, Any]:
    """What shapes a memory (a finished one is reused only under the same)."""
    settings = {"model": args.model, "chunk": args.chunk, "context": args.context, "steps": args.steps}
    settings |= {"seed": args.seed, "r": args.r, "text": dialogue_sha, "memory": memory}
    return settings | ({"lr": args.lora_lr} if memory == "lora" else {})


def memory_dir(args: argparse.Namespace, sample: str, memory: str) -> Path:
    return Path(args.work) / sample / "memories" / memory


def run_memory(spec: dict[str, Any], args: argparse.Namespace) -> None:
    """Child process: memorise one conversation into one memory and save the adapter and its record."""
    from peft_locas import LocasConfig, MemorizeConfig, memorize, templora_config

    apply_common(args)
    transformers_quiet()
    model, tokenizer = load(args)
    conversation = load_conversation(spec["data"], spec["sample"])
    conversation = dataclasses.replace(conversation, sessions=conversation.sessions[: spec["sessions"]])
    if hashlib.sha256(render_conversation(conversation).encode()).hexdigest()[:16] != spec["text"]:
        raise SystemExit(f"error: {spec['data']} changed while the benchmark ran; run it again")
    folder = memory_dir(args, spec["sample"], spec["memory"])
    cpu = time.process_time()
    if spec["memory"] == "lora":
        peft_config, lr = templora_config(args.r), args.lora_lr
    else:
        peft_config, lr = LocasConfig(r=args.r, init_weights="data"), None
    config = MemorizeConfig(
        chunk_tokens=args.chunk,
        context_tokens=args.context,
        steps_per_chunk=args.steps,
        objective=MEMORIES[spec["memory"]],
        lr=lr,
        seed=args.seed,
        checkpoint_dir=folder.with_suffix(".checkpoint"),
        checkpoint_every=4,
        show_progress=sys.stderr.isatty(),
    )
    result = memorize(model, tokenizer, conversation, config, peft_config=peft_config)
    result.model.save_pretrained(folder)
    record = {
        "spec": spec,
        "settings": memory_protocol(args, spec["memory"], spec["text"]),
        "result": result.to_dict(),
        "cpu_time_s": time.process_time() - cpu,  # this process only: for a resumed run, its last part
        "extra_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
    }
    (folder / "record.tmp").write_text(json.dumps(record))
    os.replace(folder / "record.tmp", folder / "record.json")


def memory_record(args: argparse.Namespace, dialogue: Dialogue, memory: str) -> dict[str, Any]:
    """The memory's record, trained in a child process unless a finished one with the same settings exists."""
    folder = memory_dir(args, dialogue.sample_id, memory)
    settings = memory_protocol(args, memory, dialogue.text_sha)
    path = folder / "record.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record["settings"] == settings:
            return record
        print(f"{dialogue.sample_id} {memory}: other settings; memorising again", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.with_suffix(".checkpoint"), ignore_errors=True)
    print(f"memorising {dialogue.sample_id} ({len(dialogue.ids)} tokens) into {memory}", flush=True)
    spec = {"memory": memory, "sample": dialogue.sample_id, "data": dialogue.source}
    spec |= {"sessions": len(dialogue.conversation.sessions), "text": dialogue.text_sha}
    command = [sys.executable, __file__, "--run-memory", json.dumps(spec), *child_arguments(args)]
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SystemExit(f"error: memorising {dialogue.sample_id} into {memory} failed (exit {done.returncode})")
    return json.loads(path.read_text())


def child_arguments(args: argparse.Namespace) -> list[str]:
    keys = ("model", "chunk", "context", "steps", "seed", "r", "lora_lr", "threads", "device", "dtype", "work")
    values = {key: getattr(args, key) for key in keys}
    return list(
        itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in values.items() if v is not None)
    )


# ---------------------------------------------------------------------------------------------------- models
def tiny_folder(work: Path) -> Path:
    """A seeded tiny Llama with a tiny byte-level BPE tokenizer (trained on a generated probe dialogue), saved once
    in the work folder: `common.tiny_model_folder` has no tokenizer, and this benchmark renders and prompts text."""
    folder = work / "tiny_model"
    if (folder / "tokenizer.json").exists():
        return folder
    import torch
    import transformers as tf
    from recall_probe import generate_probe
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample = generate_probe(facts=30, tokens=3000, seed=1234)[0]
    lines = [turn["text"] for key, turns in sample["conversation"].items() if key[-1].isdigit() for turn in turns]
    lines += [qa["question"] + " " + qa["answer"] for qa in sample["qa"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(lines, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    config = tf.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    building = work / "tiny_model.tmp"
    shutil.rmtree(building, ignore_errors=True)
    tf.LlamaForCausalLM(config).save_pretrained(building)
    fast.save_pretrained(building)
    os.replace(building, folder)
    return folder


def transformers_quiet() -> None:
    """No weight-loading progress bars: this script loads a model per memory, and its log is read as a record."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` for ``--model`` (``tiny``: `tiny_folder`)."""
    return load_model(str(model_folder(args)))


def model_folder(args: argparse.Namespace) -> Path:
    """The folder ``--model`` names (``tiny``: `tiny_folder`; ``default``: the prepared SmolLM2)."""
    if args.model == "tiny":
        return tiny_folder(Path(args.work))
    from peft_locas.assets import default_model_dir

    folder = default_model_dir() if args.model == "default" else Path(args.model)
    if folder is None:
        raise SystemExit("error: the real model is not prepared; run `python -m peft_locas.assets` first")
    return folder


def chosen_lora_lr(args: argparse.Namespace) -> tuple[float, str]:
    """``--lora-lr``, else the learning rate book_ppl.py's full sweep chose (so locomo judges the LoRA the books
    judged), and where it came from.

    Raises:
        SystemExit: neither exists (the message names the run to make or the option to give).
    """
    if args.lora_lr is not None:
        return args.lora_lr, "--lora-lr"
    return swept_lora_lr(False, "--lora-lr"), "book_ppl.json's sweep"


# ---------------------------------------------------------------------------------------------------- one conversation
def setting_names(memories: list[str]) -> list[str]:
    """Every setting, grouped by window: ``none``, ``none+<memory>``..., ``short``, ..., ``long+<memory>``."""
    return [window + (f"+{memory}" if memory else "") for window in WINDOWS for memory in ["", *memories]]


def run_conversation(dialogue: Dialogue, args: argparse.Namespace, tokenizer, count) -> dict[str, Any]:
    """Every setting of one conversation, reusing finished answers; returns its records and costs."""
    from peft import PeftModel

    from peft_locas.recall.asking import Asker

    views = {
        "none": view(dialogue, "none", None, count),
        "short": view(dialogue, "short", args.short_tokens, count),
        "long": view(dialogue, "long", args.long_tokens, count),
    }
    folder = Path(args.work) / dialogue.sample_id / "answers"
    folder.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "dataset": dialogue.dataset,
        "sample": dialogue.sample_id,
        "tokens": len(dialogue.ids),
        "sessions": len(dialogue.conversation.sessions),
        "sessions_total": dialogue.sessions_total,
        "questions": len(dialogue.questions),
        "windows": {name: {"start_token": v.start_token, "tokens": v.tokens} for name, v in views.items()},
        "memories": {},
        "settings": {},
    }
    records: dict[str, list[dict[str, Any]]] = {}
    for memory in ["", *args.memory_list]:
        record = memory_record(args, dialogue, memory) if memory else None
        if record is not None:
            result = record["result"]
            info["memories"][memory] = {
                "wall_s": result["wall_time_s"],
                "cpu_s": record["cpu_time_s"],
                "memorised_tokens": result["total_tokens"],
                "prequential_ppl": result["perplexity"],
                "extra_params": record["extra_params"],
            }
        model = None
        for window in WINDOWS:
            name = window + (f"+{memory}" if memory else "")
            shown = views[window]
            header = {
                "model": args.model,
                "text": dialogue.text_sha,
                "window": {"unit": shown.unit, "tokens": shown.tokens},
                "answer_tokens": args.answer_tokens,
                "seed": args.seed,
                "memory": fingerprint(record["settings"]) if record else None,
            }
            path = folder / f"{name}.jsonl"
            done = read_answers(path, header)
            todo = [(i, q) for i, q in dialogue.questions if i not in done]
            answered = 0
            if todo:
                if model is None:
                    model, _ = load(args)
                    if memory:
                        model = PeftModel.from_pretrained(model, memory_dir(args, dialogue.sample_id, memory))
                    model.eval()
                print(f"{dialogue.sample_id} {name}: {len(todo)} questions ({len(done)} answered before)", flush=True)
                asker = Asker(model, tokenizer, context=shown.context, max_new_tokens=args.answer_tokens)
                fresh = not path.exists()
                with path.open("a") as out:
                    if fresh:
                        out.write(json.dumps({"header": header}) + "\n")
                    answered = answer_questions(asker, dialogue, shown, todo, args, out)
                done = read_answers(path, header)
            chosen = [done[i] for i, _ in dialogue.questions]
            records[name] = [{**item, "sample": dialogue.sample_id} for item in chosen]
            info["settings"][name] = {
                "wall_s": sum(item["wall_s"] for item in chosen),
                "cpu_s": sum(item["cpu_s"] for item in chosen),
                "answered_now": answered,
                "reused": len(chosen) - answered,
            }
        del model
    order = setting_names(args.memory_list)
    info["settings"] = {name: info["settings"][name] for name in order}
    return {"info": info, "records": {name: records[name] for name in order}}


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=QUICK_HELP + ". Full mode: every conversation, every question."
    )
    add_common_arguments(parser)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LoCoMo-layout JSON (default: %(default)s)")
    parser.add_argument("--samples", default=None, help="comma-separated sample ids, or a count of the first ones")
    parser.add_argument("--questions", type=int, default=None, help="per conversation (default all, quick 40)")
    parser.add_argument("--quick-tokens", type=int, default=4096, help="quick: keep the first sessions within this")
    parser.add_argument("--probe", action="store_true", help="also run a recall probe (recall_probe.py) beside LoCoMo")
    parser.add_argument("--no-locomo", action="store_true", help="skip --data (e.g. only the probe)")
    parser.add_argument("--probe-facts", type=int, default=None, help="probe facts (default 40, quick 16)")
    parser.add_argument("--probe-tokens", type=int, default=None, help="probe length (default 12000, quick 3000)")
    parser.add_argument("--memories", default=",".join(MEMORIES), help=f"any of {', '.join(MEMORIES)}")
    parser.add_argument("--r", type=int, default=64, help="width of every memory (LoRA rank)")
    parser.add_argument("--chunk", type=int, default=512, help="memorising: tokens per chunk")
    parser.add_argument("--context", type=int, default=256, help="memorising: prefix tokens before each chunk")
    parser.add_argument("--steps", type=int, default=2, help="memorising: optimiser steps per chunk")
    parser.add_argument("--lora-lr", type=float, default=None, help="default: the one book_ppl.py's sweep chose")
    parser.add_argument("--short-tokens", type=int, default=1024, help="the short window, in tokens")
    parser.add_argument("--long-tokens", type=int, default=None, help=f"default: positions - {PROMPT_RESERVE}")
    parser.add_argument("--answer-tokens", type=int, default=32, help="greedy answer length limit")
    parser.add_argument("--work", default=None, help="memories and answers (default under ~/.cache)")
    parser.add_argument("--run-memory", default=None, help=argparse.SUPPRESS)  # one memory, in a child process
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_work(args, "locomo")
    if args.run_memory is not None:
        run_memory(json.loads(args.run_memory), args)
        return 0
    started = time.perf_counter()
    apply_common(args)
    transformers_quiet()
    args.memory_list = [m for m in args.memories.split(",") if m]
    unknown = [m for m in args.memory_list if m not in MEMORIES]
    if unknown:
        parser.error(f"--memories: unknown {', '.join(unknown)}; choose from {', '.join(MEMORIES)}")
    if args.no_locomo:
        args.data = None
    if args.data is None and not args.probe:
        parser.error("nothing to run: drop --no-locomo or add --probe")
    args.lora_lr, lr_source = chosen_lora_lr(args)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    if args.long_tokens is None:
        args.long_tokens = AutoConfig.from_pretrained(model_folder(args)).max_position_embeddings - PROMPT_RESERVE
    chosen = dialogues(args, tokenizer, count)
    runs = [run_conversation(dialogue, args, tokenizer, count) for dialogue in chosen]
    datasets = aggregate(runs, args.memory_list)

    print(f"\nLoCoMo categories: {', '.join(f'{k} = {v}' for k, v in CATEGORIES.items())}")
    for dataset, summary in datasets.items():
        print(f"\n{dataset}: F1 x100 and gold log-likelihood per token, mean ± standard error")
        print_table(table_rows(summary), list(table_rows(summary)[0]))
        print(f"\n{dataset}: F1 x100 per category")
        rows = category_rows(summary)
        print_table(rows, list(dict.fromkeys(key for row in rows for key in row)))
        print(f"\n{dataset}: paired differences per question (a - b)")
        print_table(paired_rows(summary), list(paired_rows(summary)[0]))

    figure = figure_path("locomo", args)
    plot(datasets, figure)
    conversations = {dialogue.sample_id: run["info"] for dialogue, run in zip(chosen, runs, strict=True)}
    total = sum(
        sum(part["wall_s"] for part in info["memories"].values())
        + sum(part["wall_s"] for part in info["settings"].values())
        for info in conversations.values()
    )
    quick = None
    if args.quick:
        kept = "; ".join(
            f"{sample}: sessions 1-{info['sessions']} of {info['sessions_total']} ({info['tokens']} tokens), "
            f"{info['questions']} questions"
            for sample, info in conversations.items()
        )
        quick = f"{QUICK_HELP}. This run: {kept}."
    results = {
        "mode": "quick" if args.quick else "full",
        "quick_mode": quick,
        "category_names": {str(k): v for k, v in CATEGORIES.items()},
        "adversarial_gold": ADVERSARIAL_GOLD,
        "protocol": {
            "memories": args.memory_list,
            "r": args.r,
            "chunk": args.chunk,
            "context": args.context,
            "steps": args.steps,
            "lora_lr": args.lora_lr,
            "lora_lr_source": lr_source,
            "short_tokens": args.short_tokens,
            "long_tokens": args.long_tokens,
            "answer_tokens": args.answer_tokens,
        },
        "conversations": conversations,
        "datasets": datasets,
        "total_wall_time_s": total,
        "wall_time_s_of_this_invocation": time.perf_counter() - started,
        "plot": figure.name,
    }
    path = write_results("locomo", args, results)
    print(f"\nresults: {path}; plot: {figure}; total wall time of all runs {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
