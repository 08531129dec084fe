"""What ``ask`` and ``chat`` share: their options, the recent context a question is asked with (a file,
``--context``, or the last N tokens of the text the adapter memorised, ``--context-tokens``, read again from the path
and sample its results recorded), and the `Asker` over the loaded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .inputs import RESULTS_FILE, adapter_config, memorize_record, model_dir, read_source
from .options import UsageError, int_at_least, model_options, positive_int


def add_asking_options(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, context and decoding options shared by ``ask`` and ``chat``."""
    model_options(parser, default_help="the base the adapter recorded, else the prepared SmolLM2")
    parser.add_argument(
        "--adapter", type=Path, default=None, help="adapter folder (none: ask --model as it is, e.g. a merged folder)"
    )
    context = parser.add_mutually_exclusive_group()
    context.add_argument("--context", default=None, help="a text or conversation file put before every question")
    context.add_argument(
        "--context-tokens",
        type=int_at_least(0),
        default=None,
        help="the last N tokens of the text the adapter memorised, put before every question",
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
    if args.context_tokens is not None and args.adapter is None:
        raise UsageError("--context-tokens needs --adapter: it takes the end of the text that adapter memorised")
    if args.context_tokens is not None:
        _memorised_source(args.adapter)
    elif args.context is not None:
        read_source(args.context, args.sample, flag="--context")


def _memorised_source(adapter: Path):
    record = memorize_record(adapter)
    if record is None or "text_path" not in record:
        raise UsageError(
            f"--context-tokens: {adapter / RESULTS_FILE} is missing or names no text (adapters from `peft-locas "
            "memorize` record it); give the context with --context FILE instead"
        )
    return read_source(record["text_path"], record.get("sample")), record.get("settings", {}).get("max_tokens")


def context_text(args: argparse.Namespace, tokenizer) -> str | None:
    """The context as text: the file, or the memorised text's last ``--context-tokens`` tokens (decoded)."""
    if args.context is not None:
        return read_source(args.context, args.sample, flag="--context").text
    if not args.context_tokens:
        return None
    source, max_tokens = _memorised_source(args.adapter)
    ids = tokenizer(source.text, verbose=False)["input_ids"][:max_tokens]  # what memorize read (max_tokens None: all)
    return tokenizer.decode(ids[-args.context_tokens :])


def load_asker(args: argparse.Namespace):
    """The model (with ``--adapter`` when given) and its `Asker`, once every cheap check has passed."""
    check_context(args)
    if args.adapter is not None:
        adapter_config(args.adapter)
    folder = model_dir(args.model, args.adapter)

    from ..recall.asking import Asker
    from .loading import load, load_adapter

    model, tokenizer, _ = load(folder, args)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    # a context longer than the model takes keeps its end (cut at a line start), leaving room for question and answer
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    room = None if positions is None else max(positions - args.max_new_tokens - 256, 1)
    return Asker(
        model,
        tokenizer,
        context_text(args, tokenizer),
        max_context_tokens=room,
        system_prompt=args.system,
        use_chat_template=False if args.no_chat_template else None,
        max_new_tokens=args.max_new_tokens,
    )
