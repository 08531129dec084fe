"""``peft-locas eval``: a text's chunked perplexity (nothing is trained), with and without an adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from .inputs import adapter_config, model_dir, read_sources
from .options import int_at_least, model_options, text_options, token_limit


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="chunked perplexity of a text, with and without an adapter")
    model_options(parser, default_help="the base the adapter recorded, else the prepared SmolLM2")
    parser.add_argument("--adapter", type=Path, default=None, help="adapter folder; compared with the bare model")
    text_options(parser, "scored")
    parser.add_argument("--chunk-tokens", type=int_at_least(2), default=512, help="tokens per chunk")
    parser.add_argument("--context-tokens", type=int_at_least(0), default=256, help="attention prefix per chunk")
    parser.add_argument("--max-tokens", type=token_limit, default=None, help="score the first N tokens, or all")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sources = read_sources(args.text, args.sample, args.encoding)
    if args.adapter is not None:
        adapter_config(args.adapter)
    folder = model_dir(args.model, args.adapter)

    from ..engine.memorization import evaluate
    from .loading import load, load_adapter
    from .memorize import summary_table

    model, tokenizer, ranks = load(folder, args)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    result = evaluate(
        model,
        tokenizer,
        sources[0].memorized if len(sources) == 1 else [source.memorized for source in sources],
        chunk_tokens=args.chunk_tokens,
        context_tokens=args.context_tokens,
        max_tokens=args.max_tokens,
        compare_baseline=args.adapter is not None,
        show_progress=ranks.is_main,
    )
    if ranks.is_main:
        measure = f"perplexity, {args.context_tokens}-token prefix"  # nothing trained: not prequential
        print(
            summary_table(
                result, with_label="with adapter" if args.adapter else "model", measure=measure, without="adapter"
            )
        )
    return 0
