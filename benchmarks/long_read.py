"""Longer reading: one novel read far past book_ppl's 16K tokens (default: Emma, its first 65,536 tokens) by Locas
memories of several widths and a TempLoRA-style LoRA, to see whether width starts to matter as the text grows (the
paper's 200K-token books, Locas-GLU on Qwen3: r=16 19.14, r=64 19.04, r=128 19.02).

Every method reads the book under `book_ppl.py`'s protocol and runs as its runs do (a process of its own, a `memorize()`
checkpoint every 8 chunks in ``--work``, so a rerun of the same command resumes): no memory, Locas-GLU ``top_k`` at each
r of ``--ranks``, LoRA r=64 on all linear layers at the learning rate book_ppl.py's sweep chose (or at each rate of
``--lora-lrs``; with more than one, the rows are named by rate), and (unless ``--no-long-window``) the long window as a
reference. Reported: the running prequential perplexity against the position in the book (the plot) and the perplexity
of each ``--segment``-token stretch, so that a late stretch shows what a memory still gains after it has read a lot.
Times are single runs, in the JSON only: ratios come from interleaved repeats (`steps_pareto.py`, `overhead.py`).

    python benchmarks/long_read.py [--quick] [--book emma] [--tokens 65536] [--ranks 16,64,256] [--threads 1]
        [--lora-lrs 1e-3,5e-4]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from book_ppl import (
    LONG_WINDOW,
    NO_MEMORY,
    add_protocol_arguments,
    completed,
    locas_spec,
    lora_spec,
    plot,
    swept_lora_lr,
)
from common import (
    add_common_arguments,
    apply_common,
    figure_path,
    learning_rates,
    print_table,
    set_work,
    write_results,
)


def segment_perplexities(result: dict[str, Any], segment: int) -> list[float]:
    """Perplexity of each ``segment``-token stretch of the text (tokens 1..segment, segment+1..2*segment, ...) from a
    `MemorizeResult` dict's per-chunk ``token_counts`` and mean ``losses`` (nats/token); a chunk counts in the
    stretch its last token lies in, so chunk sizes that divide ``segment`` split it exactly."""
    sums: dict[int, tuple[float, int]] = {}
    last = 0  # the last token scored so far (the first token is never predicted)
    for count, loss in zip(result["token_counts"], result["losses"], strict=True):
        last += count
        nll, tokens = sums.get(last // segment, (0.0, 0))
        sums[last // segment] = (nll + count * loss, tokens + count)
    return [math.exp(nll / tokens) for _, (nll, tokens) in sorted(sums.items())]


def tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens and tokens % 1024 == 0 else str(tokens)


def method_specs(ranks: list[int], lora_lrs: list[float], long_window: bool) -> list[dict[str, Any]]:
    """The runs, the memories first: the long window (as much context as the model takes) is a reference, and at 64K
    tokens the slowest memory-free run."""
    specs = [NO_MEMORY, *(locas_spec(r, "top_k") for r in ranks), *(lora_spec(lr) for lr in lora_lrs)]
    return specs + ([LONG_WINDOW] if long_window else [])


def named_by_rate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, with each LoRA run's method naming its learning rate when there are several (``lora r=64 lr
    0.0005``); only for the table and plot: a run's id, and so its stored result, keeps the plain name."""
    if sum(record["spec"]["kind"] == "lora" for record in records) < 2:
        return records
    return [
        {**record, "spec": {**record["spec"], "method": f"{record['spec']['method']} lr {record['spec']['lr']:g}"}}
        if record["spec"]["kind"] == "lora"
        else record
        for record in records
    ]


def rows_of(records: list[dict[str, Any]], segment: int) -> list[dict[str, Any]]:
    """One row per method: overall perplexity, each stretch's, extra parameters, single-run wall and CPU seconds."""
    rows = []
    for record in records:
        result = record["result"]
        stretches = segment_perplexities(result, segment)
        row = {"method": record["spec"]["method"], "ppl": result["perplexity"]}
        row |= {
            f"ppl {tokens_label(i * segment)}-{tokens_label((i + 1) * segment)}": p for i, p in enumerate(stretches)
        }
        row |= {"extra params": record["extra_params"], "wall s": result["wall_time_s"], "CPU s": record["cpu_time_s"]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--book", default="emma", help="a prepared novel (`python -m peft_locas.assets --list`)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens read (default 65536, quick 2048)")
    parser.add_argument("--ranks", default=None, help="Locas widths, comma-separated (default 16,64,256, quick 16,64)")
    parser.add_argument("--segment", type=int, default=None, help="tokens per reported stretch (default 16384)")
    parser.add_argument(
        "--lora-lrs",
        default=None,
        help="LoRA learning rates, comma-separated, a LoRA run each, named by rate when several (default: the one "
        "book_ppl.py's sweep chose)",
    )
    parser.add_argument("--no-long-window", action="store_true", help="skip the long-window reference run")
    add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    apply_common(args)
    tokens = args.tokens or (2048 if args.quick else 65536)
    segment = args.segment or (tokens // 4 if args.quick else 16384)
    ranks = [int(r) for r in (args.ranks or ("16,64" if args.quick else "16,64,256")).split(",")]
    if segment % args.chunk:
        parser.error(f"--segment {segment} must be a multiple of --chunk {args.chunk} to split the chunks exactly")
    set_work(args, "long_read")
    started = time.perf_counter()
    if args.lora_lrs is None:
        lora_lrs = [swept_lora_lr(args.quick, "--lora-lrs")]
    else:
        lora_lrs = learning_rates(parser, "--lora-lrs", args.lora_lrs)
    records = [
        completed({**spec, "book": args.book, "tokens": tokens}, args)
        for spec in method_specs(ranks, lora_lrs, not args.no_long_window)
    ]
    records = named_by_rate(records)
    rows = rows_of(records, segment)
    print(f"\n{args.book}, {tokens} tokens, window {args.context}+{args.chunk}, {args.steps} steps per chunk:")
    print_table(rows, list(rows[0]))
    figure = figure_path("long_read", args)
    plot({args.book: records}, figure)
    results = {
        "book": args.book,
        "tokens": tokens,
        "segment": segment,
        "lora_lrs": lora_lrs,
        "rows": rows,
        "runs": records,
        "wall_time_s_of_this_invocation": time.perf_counter() - started,
        "plot": figure.name,
    }
    path = write_results("long_read", args, results)
    print(f"\nresults: {path}; plot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
