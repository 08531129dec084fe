"""What ``ask`` and ``chat`` share: their options, the recent context a question is asked with (a file,
``--context``, or the last N tokens of the text the adapter memorised, ``--context-tokens``, read again from the path
and sample its results recorded), and the `Asker` over the loaded model.

Both contexts are fitted with `peft_locas.recall.prompts.fit_context`: a context longer than its budget (``N``, and
the model's positions less the answer's and `QUESTION_ROOM`) keeps its end, from a line start, and stderr says so in
one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .inputs import RESULTS_FILE, adapter_config, memorize_record, model_dir, read_source
from .options import UsageError, int_at_least, model_options, positive_int

#: tokens a fitted context leaves for the instruction, the chat template and the question (besides the answer's)
QUESTION_ROOM = 256


def add_asking_options(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, context and decoding options shared by ``ask`` and ``chat``."""
    model_options(parser, default_help="the base the adapter recorded, else the prepared SmolLM2")
    parser.add_argument(
        "--adapter", type=Path, default=None, help="adapter folder (none: ask --model as it is, e.g. a merged folder)"
    )
    context = parser.add_mutually_exclusive_group()
    context.add_argument(
        "--context",
        default=None,
        help="a text or conversation file, or a prepared book's name, put before every question (its end if it is "
        "too long; the cut moves to a line start when one is near)",
    )
    context.add_argument(
        "--context-tokens",
        type=int_at_least(0),
        default=None,
        help="the last N tokens (at most) of the text the adapter (or a merged --model folder) memorised, put before "
        "every question; the cut moves to a line start when one is near",
    )
    parser.add_argument("--sample", default=None, help="the sample_id to take from LoCoMo files (default: the first)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer, in tokens")
    parser.add_argument("--system", default=None, help="a system prompt (models with a chat template)")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="plain text prompts even where the model has a chat template"
    )


def check_context(args: argparse.Namespace) -> None:
    """Cheap checks of the context options, before the model loads."""
    if args.sample is not None and args.context is None and getattr(args, "questions", None) is None:
        raise UsageError("--sample applies to LoCoMo files given with --context or --questions")
    if args.context_tokens is not None:
        folder = _record_folder(args)
        if folder is None:
            raise UsageError(
                f"--context-tokens needs --adapter, or a merged --model folder holding its {RESULTS_FILE}: it takes "
                "the end of the text that memory memorised"
            )
        _memorised_source(folder)
    elif args.context is not None:
        read_source(args.context, args.sample, flag="--context")


def _record_folder(args: argparse.Namespace) -> Path | None:
    """Where ``--context-tokens`` finds the memorize record: ``--adapter``, else a ``--model`` folder holding one (a
    merged checkpoint: `merge` copies its adapter's record into it); ``None`` without either."""
    if args.adapter is not None:
        return args.adapter
    model = Path(args.model) if args.model is not None else None
    return model if model is not None and (model / RESULTS_FILE).is_file() else None


def _recorded_texts(adapter: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The adapter's memorize record (None without one) and the texts it names, in order."""
    record = memorize_record(adapter)
    return record, (record or {}).get("texts") or ([record] if record and record.get("text_path") else [])


def memory_instruction_of(folders: list[Path]) -> str:
    """How a question is asked of these memories (adapters, or a merged checkpoint) without a context:
    `peft_locas.recall.prompts.memory_instruction` of whether every text their memorize records name (those of the
    memories a composed one came from, too) is a conversation. A folder without a record (an adapter saved from
    Python, a base model) counts as a conversation's."""
    from ..recall.dialogue import is_conversation_file  # no torch: cheap
    from ..recall.prompts import memory_instruction  # no torch either

    paths, todo, seen = [], list(folders), set()
    while todo:
        folder = Path(todo.pop())
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        record, texts = _recorded_texts(folder)
        paths += [text["text_path"] for text in texts if text.get("text_path")]
        todo += (record or {}).get("composed_from", [])
    return memory_instruction(all(is_conversation_file(path) for path in paths))


def _memorised_source(adapter: Path) -> tuple[list[Any], int | None]:
    """The sources the adapter's memorize run read (its record's ``texts``, in order), and its ``max_tokens``."""
    record, texts = _recorded_texts(adapter)
    if not texts:
        raise UsageError(
            f"--context-tokens: {adapter / RESULTS_FILE} is missing or names no text (adapters from `peft-locas "
            "memorize` record it); give the context with --context FILE instead"
        )
    encoding = record.get("encoding", "utf-8")
    sources = [read_source(text["text_path"], text.get("sample"), encoding) for text in texts]
    return sources, record.get("settings", {}).get("max_tokens")


def context_text(args: argparse.Namespace, tokenizer: Any, positions: int | None) -> str | None:
    """The context put before every question, fitted with `fit_context` (its end, from a line start when a line
    starts near the cut): the ``--context`` file, or the last ``--context-tokens`` tokens of the text the adapter (or
    the merged checkpoint's adapter) memorised (the part `memorize` read, up to its recorded ``max_tokens``); ``None``
    without either (or with ``--context-tokens 0``). A model of ``positions`` positions takes at most ``positions -
    --max-new-tokens -`` `QUESTION_ROOM` context tokens. A cut context is reported on stderr in one line, its tokens
    kept of how many.

    Raises:
        UsageError: the model's positions leave no room for a context beside the answer and the question.
    """
    if args.context is not None:
        text, what = read_source(args.context, args.sample, flag="--context").text, args.context
    elif args.context_tokens:
        sources, max_tokens = _memorised_source(_record_folder(args))
        # several texts were memorised as one, joined as memorize joins them
        from ..engine.chunking import documents_text

        whole = sources[0].text if len(sources) == 1 else documents_text([s.memorized for s in sources])[0]
        text, what = _memorised_text(tokenizer, whole, max_tokens), "the memorised text"
    else:
        return None
    budgets = {}  # each limit on the context's tokens, by what a cut message says of it
    if args.context is None:
        budgets[f"--context-tokens {args.context_tokens}"] = args.context_tokens
    if positions is not None:
        room = positions - args.max_new_tokens - QUESTION_ROOM
        if room < 1:
            raise UsageError(
                f"the model's {positions} positions leave no room for a context beside {args.max_new_tokens} for the "
                f"answer and {QUESTION_ROOM} for the question: lower --max-new-tokens, or ask without a context"
            )
        limit = (
            f"the model's {positions} positions less {args.max_new_tokens} for the answer, {QUESTION_ROOM} for the "
            "question"
        )
        budgets[limit] = room
    if not budgets:
        return text
    why, budget = min(budgets.items(), key=lambda item: item[1])  # a tie names --context-tokens, given first
    from ..recall.prompts import fit_context

    kept = fit_context(tokenizer, text, budget)
    if kept != text:
        # fit_context moves a cut to the next line start when one is near: say whether it found one
        start = ", from a line start" if text.endswith(kept) and text[-len(kept) - 1] == "\n" else ""
        counts = f"{_count(tokenizer, kept):,} of {_count(tokenizer, text):,}"
        print(f"context: kept the last {counts} tokens of {what}{start} ({why})", file=sys.stderr)
    return kept


def _memorised_text(tokenizer: Any, text: str, max_tokens: int | None) -> str:
    """The part of ``text`` that `memorize` read: its first ``max_tokens`` tokens as ``tokenizer(text)`` gives them
    (special tokens included), all of it for ``None``."""
    if max_tokens is None:
        return text
    if not getattr(tokenizer, "is_fast", False):  # no offsets: the tokens decoded
        ids = tokenizer(text, verbose=False)["input_ids"]
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    encoded = tokenizer(text, return_offsets_mapping=True, verbose=False)
    if len(encoded["input_ids"]) <= max_tokens:
        return text
    return text[: max(end for _, end in encoded["offset_mapping"][:max_tokens])]


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def load_asker(args: argparse.Namespace):
    """The model (with ``--adapter`` when given) and its `Asker`, once every cheap check has passed."""
    check_context(args)
    if args.adapter is not None:
        adapter_config(args.adapter, library_hint=f" (ask --memory {args.adapter} asks them all)")
    folder = model_dir(args.model, args.adapter)

    from ..recall.asking import Asker, max_positions
    from .loading import load, load_adapter

    model, tokenizer, _ = load(folder, args)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    context = context_text(args, tokenizer, max_positions(model))
    return Asker(
        model,
        tokenizer,
        context,
        instruction=memory_instruction_of([args.adapter or folder]) if context is None else None,
        system_prompt=args.system,
        use_chat_template=False if args.no_chat_template else None,
        max_new_tokens=args.max_new_tokens,
    )
