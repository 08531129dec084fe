"""``peft-locas memorize``: write a text or a conversation into a Locas memory (or a TempLoRA LoRA baseline) and save
the adapter with its results and a loss plot."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .inputs import (
    RESULTS_FILE,
    Source,
    adapter_config,
    base_fingerprint,
    check_library_out,
    check_out,
    model_dir,
    plural,
    read_sources,
)
from .options import (
    UsageError,
    int_at_least,
    model_options,
    non_negative_float,
    positive_float,
    positive_int,
    text_options,
    token_limit,
    top_k,
)
from .output import atomic_folder, check_writable, no_space

PLOT_FILE = "memorize_losses.png"
# MemorizeConfig's choices, kept here so that --help needs no torch (a test checks they agree)
INIT_METHODS = ("top_k", "bottom_k", "random_clone", "gaussian", "activation_keys", "param_norm", "gradient")
OBJECTIVES = ("ntp", "distill")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("memorize", help="memorise a text into a Locas memory (score, then train)")
    model_options(parser, default_help="the prepared SmolLM2; with --adapter, the base it recorded")
    text_options(parser, "memorised", " (with --separate: each into its own memory)")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="adapter folder to write (with results and plot); with --separate, a folder of memories, one subfolder "
        "per text (memories already there are kept)",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="continue this memory (from memorize) on the text (default: a new memory)",
    )
    parser.add_argument(
        "--adapter-type", choices=("locas", "lora"), default=None, help="lora: TempLoRA baseline (default: locas)"
    )
    parser.add_argument(
        "--r",
        "--width",
        dest="r",
        type=positive_int,
        default=None,
        help="memory width (LoRA rank for lora), default 64; spell it --width under torchrun or accelerate launch, "
        "whose own parsers take --r for an abbreviation of their options",
    )
    parser.add_argument("--chunk-tokens", type=int_at_least(2), default=512, help="tokens per chunk")
    parser.add_argument("--context-tokens", type=int_at_least(0), default=256, help="attention prefix per chunk")
    parser.add_argument("--steps-per-chunk", type=int_at_least(0), default=2, help="training steps after scoring")
    parser.add_argument("--lr", type=positive_float, default=None, help="default: 4e-3 (Locas), 5e-5 (LoRA)")
    parser.add_argument("--init", choices=INIT_METHODS, default=None, help="Locas initialisation (default: top_k)")
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
        "--distill-top-k",
        type=top_k,
        default=64,
        help="distill and self-study: the teacher's most probable tokens kept per position, or all",
    )
    parser.add_argument(
        "--ntp-weight", type=non_negative_float, default=0.0, help="distill: weight of the next-token loss added"
    )
    parser.add_argument(
        "--self-study-steps",
        type=int_at_least(0),
        default=None,
        help="optimiser steps per chunk on its self-study questions (default: --steps-per-chunk)",
    )
    parser.add_argument(
        "--self-study-questions",
        type=int_at_least(0),
        default=0,
        help="questions the model writes and answers about each chunk, then learns to answer without it (0: off)",
    )
    parser.add_argument("--max-tokens", type=token_limit, default=None, help="memorise the first N tokens, or all")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seeds the adapter's creation and training")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="save here, and resume from here (default: OUT.checkpoint)"
    )
    parser.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint (a crash loses the run)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=1, help="chunks between checkpoints")
    parser.add_argument("--compare-baseline", action="store_true", help="also score each chunk without memory")
    parser.add_argument(
        "--separate",
        action="store_true",
        help="one memory per text (each file of a folder too), trained side by side in one batched run; --out gets "
        "one adapter folder per text, named after its file (printed before training)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (with --separate: replace the memories of the same names)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = None
    if args.separate:
        from .memorize_separate import adapter_names

        sources = read_sources(args.text, args.sample, args.encoding)
        names = adapter_names(sources)
        folders = tuple(Path(spec) for spec in args.text if Path(spec).is_dir())
        check_library_out(args.out, names, args.overwrite, (args.adapter, args.model, *folders))
    else:
        check_out(args.out, args.overwrite, (args.adapter, args.model))
    check_writable(args.out)
    if names is None:
        sources = read_sources(args.text, args.sample, args.encoding)
    continued = _continued(args)
    if args.adapter_type == "lora" and args.init is not None:
        raise UsageError("--init chooses how a Locas memory starts; LoRA adapters start as LoRA does: drop --init")
    folder = model_dir(args.model, args.adapter)
    default_checkpoints = args.checkpoint_dir is None and not args.no_checkpoint
    if args.no_checkpoint and args.checkpoint_dir is not None:
        raise UsageError("--no-checkpoint and --checkpoint-dir contradict each other: give one")
    if default_checkpoints:
        args.checkpoint_dir = args.out.with_name(f"{args.out.name}.checkpoint")
    if args.checkpoint_dir is not None:
        check_writable(args.checkpoint_dir, "--checkpoint-dir")
    if args.separate:
        _check_separate(args, sources)
    memorized = sources[0].memorized if len(sources) == 1 else [source.memorized for source in sources]
    label = args.text[0] if len(args.text) == 1 and Path(args.text[0]).is_dir() else "+".join(s.label for s in sources)

    from ..engine.memorization import MemorizeConfig, memorize, templora_config
    from ..tuner.config import LocasConfig
    from .loading import load, load_adapter, load_tokenizer
    from .run_log import RunLog, plan_line

    if continued is None:
        _check_width(folder, args.r or 64, args.adapter_type or "locas")
    tokenizer = load_tokenizer(folder)  # before the model: the text's length is checked against the chunks first
    if args.separate:
        plans = [_plan(tokenizer, source.memorized, args, source.label) for source in sources]
        num_tokens, num_chunks = sum(p[0] for p in plans), max(p[1] for p in plans)
        label = f"{len(sources)} {plural(len(sources), 'text')}, each into its own memory,"
    else:
        num_tokens, num_chunks = _plan(tokenizer, memorized, args)
    each = args.separate and len(sources) > 1
    print(plan_line(label, num_tokens, num_chunks, args, args.checkpoint_dir, per_text=each), file=sys.stderr)
    if names is not None:
        from .memorize_separate import names_line

        print(names_line(args.out, sources, names), file=sys.stderr)
    config = MemorizeConfig(
        chunk_tokens=args.chunk_tokens,
        context_tokens=args.context_tokens,
        steps_per_chunk=args.steps_per_chunk,
        lr=args.lr,
        init=None if continued else args.init or "top_k",
        objective=args.objective,
        teacher_context_tokens=args.teacher_context_tokens,
        distill_top_k=args.distill_top_k,
        ntp_weight=args.ntp_weight,
        self_study_questions=args.self_study_questions,
        self_study_steps=args.self_study_steps,
        max_tokens=args.max_tokens,
        compare_baseline=args.compare_baseline,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        show_progress=True,
    )
    model, tokenizer, ranks = load(folder, args, tokenizer)
    if continued is not None:
        model, peft_config = load_adapter(model, args.adapter, is_trainable=True), None
        adapter_type, r = continued
    else:
        adapter_type, r = args.adapter_type or "locas", args.r or 64
        peft_config = LocasConfig(r=r) if adapter_type == "locas" else templora_config(r)
    if args.separate:
        from .memorize_separate import run_separate

        return run_separate(
            args,
            sources,
            names,
            folder,
            model,
            tokenizer,
            config,
            peft_config,
            default_checkpoints,
            [p[1] for p in plans],
        )
    log = RunLog(args.checkpoint_dir, num_chunks, ranks.is_main)
    try:
        result = memorize(model, tokenizer, memorized, config, peft_config=peft_config, callback=log)
    except OSError as exc:
        full = no_space(exc, args.checkpoint_dir, "--checkpoint-dir", "the last complete checkpoint is kept")
        if full is None:
            raise
        raise full from exc
    if not ranks.is_main:
        return 0
    record = results_record(args, folder, sources, label, (adapter_type, r), config, result)
    record["continued_from"] = None if continued is None else str(args.adapter.resolve())
    record["world_size"] = ranks.size
    needed = sum(p.numel() * p.element_size() for p in result.model.parameters() if p.requires_grad) + 2**20
    with atomic_folder(args.out, needed) as partial:
        result.model.save_pretrained(partial)
        write_records(partial, record, result, label, args.checkpoint_dir)
    if default_checkpoints:  # the adapter folder now holds everything; the checkpoints only served a crash
        shutil.rmtree(args.checkpoint_dir, ignore_errors=True)
    print(summary_table(result))
    print(f"adapter, results and plot: {args.out}")
    return 0


def results_record(
    args: argparse.Namespace,
    folder: Path,
    sources: list[Source],
    label: str,
    kind: tuple[str, int],
    config: Any,
    result: Any,
) -> dict[str, Any]:
    """``memorize_results.json``: the base (and its fingerprint), the texts, the adapter, the settings, the results."""
    adapter_type, r = kind
    return {
        "model": str(folder),
        "base_fingerprint": base_fingerprint(folder),
        **_sources_record(sources, label),
        "encoding": args.encoding,
        "adapter_type": adapter_type,
        "r": r,
        "continued_from": None,
        "settings": config.protocol(adapter_type),
        "world_size": 1,
        "result": result.to_dict(),
    }


def write_records(folder: Path, record: dict[str, Any], result: Any, label: str, checkpoint_dir: Path | None) -> None:
    """Beside a saved adapter: its results record, its loss plot and the run's per-chunk log (when there is one)."""
    from ..engine.plotting import plot_losses
    from .run_log import CHUNK_LOG

    (folder / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot_losses(result, folder / PLOT_FILE, title=f"{label}: loss of each chunk before training on it")
    if checkpoint_dir is not None and (checkpoint_dir / CHUNK_LOG).is_file():
        shutil.copyfile(checkpoint_dir / CHUNK_LOG, folder / CHUNK_LOG)


def _check_separate(args: argparse.Namespace, sources: list[Source]) -> None:
    """``--separate`` trains new Locas memories, one per text, in one process; each text once."""
    seen: dict[tuple[Path, str | None], Source] = {}
    for source in sources:
        key = (source.path.resolve(), source.sample)
        if key in seen:
            raise UsageError(f"--text names {source.label} twice: each text gets one memory, so give it once")
        seen[key] = source
    refused = (
        ("--adapter", args.adapter is not None, "continue memories one at a time with --adapter"),
        ("--adapter-type lora", args.adapter_type == "lora", "memorise LoRA baselines one text at a time"),
        ("--self-study-questions", args.self_study_questions > 0, "self-study memorises one text at a time"),
    )
    for flag, given, fix in refused:
        if given:
            raise UsageError(f"--separate makes new Locas memories side by side and does not take {flag}: {fix}")


def _continued(args: argparse.Namespace) -> tuple[str, int] | None:
    """With ``--adapter``: the memory's type and width (the options that would describe a new one are refused)."""
    if args.adapter is None:
        return None
    options = (("--adapter-type", args.adapter_type), ("--r", args.r), ("--init", args.init))
    given = [flag for flag, value in options if value is not None]
    if given:
        verb = "describes" if len(given) == 1 else "describe"
        raise UsageError(f"{', '.join(given)} {verb} a new memory; --adapter continues {args.adapter} as it is")
    config = adapter_config(args.adapter)
    kind = type(config).__name__
    if kind not in ("LocasConfig", "LoraConfig"):
        raise UsageError(f"--adapter {args.adapter} is a {kind}; memorize continues Locas or LoRA adapters")
    return ("locas", config.r) if kind == "LocasConfig" else ("lora", config.r)


def _check_width(folder: Path, r: int, adapter_type: str) -> None:
    """A Locas memory starts as a copy of ``r`` of the MLP's units: refuse a wider one before the model loads."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the model load reports it
    config = config.get("text_config") or config
    width = config.get("intermediate_size") or config.get("n_inner") or 4 * config.get("n_embd", 0) or None
    if adapter_type == "locas" and isinstance(width, int) and r > width:
        raise UsageError(
            f"--r {r} exceeds the MLP's intermediate size {width} of {folder}: a Locas memory starts as a copy of r of "
            f"its units, so --r must be at most {width}"
        )


def _plan(tokenizer: Any, memorized: Any, args: argparse.Namespace, label: str | None = None) -> tuple[int, int]:
    """The token and chunk counts, so that a text too short for one chunk is refused before the model loads."""
    from ..engine.chunking import chunk_windows, tokens_and_boundaries

    ids, starts = tokens_and_boundaries(tokenizer, memorized, args.max_tokens)
    if len(ids) < args.chunk_tokens and len(ids) == args.max_tokens:  # the text is longer: the cut is what is short
        raise UsageError(
            f"--max-tokens {args.max_tokens} keeps fewer tokens than one chunk of {args.chunk_tokens}: raise "
            f"--max-tokens to at least {args.chunk_tokens} or lower --chunk-tokens"
        )
    if len(ids) < args.chunk_tokens:
        which = "the text" if label is None else f"the text {label}"
        raise UsageError(
            f"{which} has {len(ids)} tokens, fewer than one chunk of {args.chunk_tokens}: lower --chunk-tokens "
            f"(at most {len(ids)}) or give a longer text"
        )
    return len(ids), len(chunk_windows(len(ids), args.chunk_tokens, args.context_tokens, starts))


def _sources_record(sources: list[Source], label: str) -> dict[str, Any]:
    """How results name what was memorised; `ask --context-tokens` reads the same texts again from ``texts``."""
    texts = [source.record() for source in sources]
    single = texts[0] if len(texts) == 1 else {"text_path": None, "sample": None}
    return {**single, "text": label, "texts": texts}


def peak_memory_text(result: Any) -> str:
    """A result's peak memory as ``"X.XX GiB (kind)"``, or ``""`` where none was measured."""
    peak = result.peak_memory_bytes
    return "" if peak is None else f"{peak / 2**30:.2f} GiB ({result.peak_memory_kind})"


def summary_table(
    result: Any,
    with_label: str = "with memory",
    measure: str = "prequential perplexity",
    without: str = "memory",
    costs: bool = True,
) -> str:
    """The run's perplexities (with and, when recorded, without the adapter) and costs, as an aligned text table.

    Args:
        result: a `MemorizeResult`.
        with_label: the heading of the adapter's column.
        without: what the baseline column lacks ("memory", or "adapter" for eval).
        measure: what the first row measured: memorize's losses are prequential (each chunk scored before training
            on it); eval's are a plain chunked perplexity.
        costs: also the wall time, tokens/s and peak memory (off for one text of a batch, whose costs are shared).
    """
    rows = [("", with_label, f"without {without}" if result.baseline_losses is not None else "")]
    rows.append((measure, f"{result.perplexity:.3f}", _fmt(result.baseline_perplexity)))
    rows.append(
        ("mean chunk perplexity", f"{result.mean_chunk_perplexity:.3f}", _fmt(result.baseline_mean_chunk_perplexity))
    )
    chunks = len(result.token_counts)
    rows.append(("tokens scored", f"{result.total_tokens} in {chunks} {plural(chunks, 'chunk')}", ""))
    if costs:
        rows += [
            ("wall time", f"{result.wall_time_s:.1f} s", ""),
            ("tokens/s", f"{result.tokens_per_s:.1f}", ""),
            ("peak memory", peak_memory_text(result) or "n/a", ""),
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
