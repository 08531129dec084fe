"""``peft-locas memorize``: write a text or a conversation into a Locas memory (or a TempLoRA LoRA baseline) and save
the adapter with its results and a loss plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .inputs import RESULTS_FILE, check_out, model_dir, read_source
from .options import int_at_least, model_options, positive_float, positive_int, token_limit

PLOT_FILE = "memorize_losses.png"
# MemorizeConfig's choices, kept here so that --help needs no torch (a test checks they agree)
INIT_METHODS = ("top_k", "bottom_k", "random_clone", "gaussian", "activation_keys", "param_norm", "gradient")
OBJECTIVES = ("ntp", "distill")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("memorize", help="memorise a text into a Locas memory (score, then train)")
    model_options(parser)
    parser.add_argument(
        "--text",
        required=True,
        help="a UTF-8 text file, a prepared book (e.g. emma), or a conversation: LoCoMo .json or our .jsonl",
    )
    parser.add_argument("--sample", default=None, help="the sample_id to take from a LoCoMo file (default: the first)")
    parser.add_argument("--out", required=True, type=Path, help="adapter folder to write (with results and plot)")
    parser.add_argument("--adapter-type", choices=("locas", "lora"), default="locas", help="lora: TempLoRA baseline")
    parser.add_argument(
        "--r",
        "--width",
        dest="r",
        type=positive_int,
        default=64,
        help="memory width (LoRA rank for lora); spell it --width under torchrun or accelerate launch, whose own "
        "parsers take --r for an abbreviation of their options",
    )
    parser.add_argument("--chunk-tokens", type=int_at_least(2), default=512, help="tokens per chunk")
    parser.add_argument("--context-tokens", type=int_at_least(0), default=256, help="attention prefix per chunk")
    parser.add_argument("--steps-per-chunk", type=int_at_least(0), default=2, help="training steps after scoring")
    parser.add_argument("--lr", type=positive_float, default=None, help="default: 4e-3 (Locas), 5e-5 (LoRA)")
    parser.add_argument("--init", choices=INIT_METHODS, default="top_k", help="Locas initialisation method")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="ntp",
        help="ntp: next-token prediction; distill: KL from the model without memory reading a long context",
    )
    parser.add_argument(
        "--teacher-context-tokens",
        type=positive_int,
        default=None,
        help="distill: tokens the teacher reads (default: as many as the model takes)",
    )
    parser.add_argument(
        "--self-study-questions",
        type=int_at_least(0),
        default=0,
        help="questions the model writes and answers about each chunk, then learns to answer without it (0: off)",
    )
    parser.add_argument("--max-tokens", type=token_limit, default=None, help="memorise the first N tokens, or all")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seeds the adapter's creation and training")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="save here, and resume from here")
    parser.add_argument("--checkpoint-every", type=positive_int, default=1, help="chunks between checkpoints")
    parser.add_argument("--compare-baseline", action="store_true", help="also score each chunk without memory")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, args.overwrite)
    source = read_source(args.text, args.sample)
    folder = model_dir(args.model)

    from ..config import LocasConfig
    from ..memorization import MemorizeConfig, memorize, templora_config
    from ..plotting import plot_losses
    from .loading import load

    config = MemorizeConfig(
        chunk_tokens=args.chunk_tokens,
        context_tokens=args.context_tokens,
        steps_per_chunk=args.steps_per_chunk,
        lr=args.lr,
        init=args.init,
        objective=args.objective,
        teacher_context_tokens=args.teacher_context_tokens,
        self_study_questions=args.self_study_questions,
        max_tokens=args.max_tokens,
        compare_baseline=args.compare_baseline,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        show_progress=True,
    )
    model, tokenizer, ranks = load(folder, args)
    peft_config = LocasConfig(r=args.r) if args.adapter_type == "locas" else templora_config(args.r)
    result = memorize(model, tokenizer, source.memorized, config, peft_config=peft_config)
    if not ranks.is_main:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(args.out)
    record: dict[str, Any] = {
        "model": str(folder),
        **source.record(),
        "adapter_type": args.adapter_type,
        "r": args.r,
        "settings": config.protocol(args.adapter_type),
        "world_size": ranks.size,
        "result": result.to_dict(),
    }
    (args.out / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot_losses(result, args.out / PLOT_FILE, title=f"{source.label}: loss of each chunk before training on it")
    print(summary_table(result))
    print(f"adapter, results and plot: {args.out}")
    return 0


def summary_table(result: Any, with_label: str = "with memory", measure: str = "prequential perplexity") -> str:
    """The run's perplexities (with and, when recorded, without the adapter) and costs, as an aligned text table.

    Args:
        result: a `MemorizeResult`.
        with_label: the heading of the adapter's column.
        measure: what the first row measured: memorize's losses are prequential (each chunk scored before training
            on it); eval's are a plain chunked perplexity.
    """
    rows = [("", with_label, "without memory" if result.baseline_losses is not None else "")]
    rows.append((measure, f"{result.perplexity:.3f}", _fmt(result.baseline_perplexity)))
    rows.append(
        ("mean chunk perplexity", f"{result.mean_chunk_perplexity:.3f}", _fmt(result.baseline_mean_chunk_perplexity))
    )
    peak = result.peak_memory_bytes
    memory = "n/a" if peak is None else f"{peak / 2**30:.2f} GiB ({result.peak_memory_kind})"
    rows += [
        ("tokens scored", f"{result.total_tokens} in {len(result.token_counts)} chunks", ""),
        ("wall time", f"{result.wall_time_s:.1f} s", ""),
        ("tokens/s", f"{result.tokens_per_s:.1f}", ""),
        ("peak memory", memory, ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
