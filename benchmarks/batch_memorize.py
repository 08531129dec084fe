"""Batched memorisation: B texts memorised into B separate Locas memories in one run
(`memorize(..., adapter_names=[...])`) against the same B texts memorised one after the other, side by side.

Each text is the first ``--tokens`` tokens of a different prepared book, memorised into Locas r=``--r`` ``top_k``
with `book_ppl.py`'s protocol (chunks of 512 tokens, a 256-token prefix, 2 steps per chunk). Every measurement runs
in its own process (so its peak memory is its own; model loading is not timed), and the two ways are interleaved in
``--rounds`` rounds for each B, so drift hits both alike. Reported per B: tokens/s of each way (median over rounds,
with the rounds' range), the speed-up ``sequential time / batched time`` (wall and CPU), the peak resident memory of
each, and the largest difference between a text's prequential perplexity in the two ways (the memories are the same;
only float summation order differs).

    python benchmarks/batch_memorize.py [--quick] [--batch-sizes 1,2,4,8] [--tokens 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from common import (
    add_common_arguments,
    apply_common,
    book_token_ids,
    finish,
    load_model,
    measure_in_child,
    placement_arguments,
    start_clock,
)

from peft_locas import LocasConfig, MemorizeConfig, memorize
from peft_locas.assets import ALL_BOOKS

COLUMNS = [
    "B",
    "batched tok/s",
    "sequential tok/s",
    "speed-up",
    "CPU speed-up",
    "batched peak GiB",
    "sequential peak GiB",
    "max ppl diff",
]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (in this process): ``args.measure`` is ``"batched,B"`` or ``"sequential,B"``."""
    import resource

    way, batch = args.measure.split(",")
    model, tokenizer = load_model(args.model)
    texts = [book_token_ids(tokenizer, book, args.tokens) for book in ALL_BOOKS[: int(batch)]]
    config = MemorizeConfig(chunk_tokens=args.chunk, context_tokens=args.context, steps_per_chunk=args.steps)
    peft_config = LocasConfig(r=args.r)
    started, cpu = time.perf_counter(), time.process_time()
    if way == "batched":
        names = [f"text_{b}" for b in range(len(texts))]
        results = memorize(model, None, texts, config, peft_config=peft_config, adapter_names=names)
        perplexities = [result.perplexity for result in results]
    else:
        import copy

        perplexities = []
        for ids in texts:  # a fresh copy of the base each time, as separate runs would load it
            perplexities.append(memorize(copy.deepcopy(model), None, ids, config, peft_config=peft_config).perplexity)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens": sum(len(ids) for ids in texts),
        "perplexities": perplexities,
    }


def run_child(args: argparse.Namespace, way: str, batch: int) -> dict[str, Any]:
    arguments = ["--measure", f"{way},{batch}", "--model", args.model, "--r", str(args.r)]
    arguments += ["--tokens", str(args.tokens), "--chunk", str(args.chunk), "--context", str(args.context)]
    arguments += ["--steps", str(args.steps), *placement_arguments(args)]
    return measure_in_child(__file__, arguments, f"the {way} run of B={batch}")


def summarise(batch: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One table row: medians over rounds, and the rounds' range of the wall-time speed-up."""

    def median(way: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[way])

    tokens = runs["batched"][0]["tokens"]
    speedups = [s["seconds"] / b["seconds"] for b, s in zip(runs["batched"], runs["sequential"], strict=True)]
    differences = [
        abs(x - y)
        for b, s in zip(runs["batched"], runs["sequential"], strict=True)
        for x, y in zip(b["perplexities"], s["perplexities"], strict=True)
    ]
    return {
        "B": batch,
        "batched tok/s": tokens / median("batched", "seconds"),
        "sequential tok/s": tokens / median("sequential", "seconds"),
        "speed-up": median("sequential", "seconds") / median("batched", "seconds"),
        "speed-up range": [min(speedups), max(speedups)],
        "CPU speed-up": median("sequential", "cpu_seconds") / median("batched", "cpu_seconds"),
        "batched peak GiB": median("batched", "peak_bytes") / 2**30,
        "sequential peak GiB": median("sequential", "peak_bytes") / 2**30,
        "max ppl diff": max(differences),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated B (default 1,2,4,8; quick 1,2,4)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens memorised per text")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per B (default 3, quick 1)")
    parser.add_argument("--r", type=int, default=64, help="memory width")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--context", type=int, default=256, help="prefix tokens per chunk")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per chunk")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args(argv)
    apply_common(args)
    if args.measure is not None:
        print(json.dumps(measure(args)))
        return 0
    sizes = [int(b) for b in (args.batch_sizes or ("1,2,4" if args.quick else "1,2,4,8")).split(",")]
    if max(sizes) > len(ALL_BOOKS):
        raise SystemExit(f"error: at most {len(ALL_BOOKS)} texts (one per prepared book), got B={max(sizes)}")
    rounds = args.rounds or (1 if args.quick else 3)
    start_clock(args)
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {b: {"batched": [], "sequential": []} for b in sizes}
    for round_index in range(rounds):
        for batch in sizes:
            for way in ("batched", "sequential") if round_index % 2 == 0 else ("sequential", "batched"):
                runs[batch][way].append(run_child(args, way, batch))
                print(f"round {round_index + 1}/{rounds}, B={batch}, {way}: {runs[batch][way][-1]['seconds']:.1f} s")
    rows = [summarise(batch, runs[batch]) for batch in sizes]  # the children's CPU times are in the rows
    return finish(
        "batch_memorize", args, rows, COLUMNS, {"tokens_per_text": args.tokens, "r": args.r, "rounds": rounds}
    )


if __name__ == "__main__":
    sys.exit(main())
