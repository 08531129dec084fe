"""Book memorisation: prequential perplexity of a real model reading real novels with a short attention window, with
Locas memories, a TempLoRA-style LoRA, and no memory at all.

Every method reads the same chunks through `peft_locas.memorize()` (score each chunk, then train on it) or, for the
memory-free baselines, `peft_locas.evaluate()`:

- no memory: the short window only (``--chunk`` tokens scored with ``--context`` tokens of prefix);
- long window: no memory, but as much context as the model takes (chunks of ``--long-chunk`` with the rest of the
  model's positions as prefix);
- Locas-GLU top_k at r = 4, 16, 64, and r = 64 initialised with gaussian / random_clone / bottom_k;
- LoRA r=64 on all linear layers (TempLoRA's recipe), its learning rate picked by a sweep over ``--lora-lrs`` on
  another novel (``--sweep-book``), lowest prequential perplexity wins.

Each (book, method) runs in its own process, so its peak memory is its own, and writes its result to ``--work``; a
rerun skips finished runs and resumes an interrupted one from its `memorize()` checkpoint. The full mode is hours of
CPU: start it in the background and rerun the same command after an interruption.

    python benchmarks/book_ppl.py [--quick] [--books pride_and_prejudice,persuasion] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    add_common_arguments,
    apply_common,
    book_token_ids,
    figure_path,
    learning_rates,
    load_model,
    print_table,
    set_work,
    write_results,
)

from peft_locas import LocasConfig, MemorizeConfig, evaluate, memorize, templora_config
from peft_locas.engine.results import MemorizeResult

LOCAS_RUNS = [(4, "top_k"), (16, "top_k"), (64, "top_k"), (64, "gaussian"), (64, "random_clone"), (64, "bottom_k")]
LORA_R = 64
#: the memory-free runs: the short window alone, and as much context as the model takes
NO_MEMORY = {"method": "no memory", "kind": "eval"}
LONG_WINDOW = {"method": "long window", "kind": "long"}


def locas_spec(r: int, init: str) -> dict[str, Any]:
    return {"method": f"locas r={r} {init}", "kind": "locas", "r": r, "init": init}


def lora_spec(lr: float) -> dict[str, Any]:
    return {"method": f"lora r={LORA_R}", "kind": "lora", "r": LORA_R, "lr": lr}


def method_specs(lora_lr: float) -> list[dict[str, Any]]:
    """The methods compared on every book."""
    return [NO_MEMORY, LONG_WINDOW] + [locas_spec(r, init) for r, init in LOCAS_RUNS] + [lora_spec(lora_lr)]


def chosen_lora_lr(args: argparse.Namespace) -> float:
    """``--lora-lr``, else the learning rate this benchmark's sweep chose (so the benchmarks reading its runs judge the
    same LoRA).

    Raises:
        SystemExit: neither exists (the message says which run or option gives one).
    """
    return args.lora_lr if args.lora_lr is not None else swept_lora_lr(args.quick, "--lora-lr")


def swept_lora_lr(quick: bool, option: str) -> float:
    """The learning rate this benchmark's sweep chose, from its committed results (``--quick``'s when ``quick``).

    Raises:
        SystemExit: there are none (the message names the run to make, or ``option`` to give a rate).
    """
    path = RESULTS / f"book_ppl{'_quick' * quick}.json"
    if not path.exists():
        raise SystemExit(f"error: no LoRA learning rate: run book_ppl.py{' --quick' * quick} or pass {option}")
    return json.loads(path.read_text())["lora_lr_sweep"]["chosen"]


def run_one(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one (book, method) in this process and return its record."""
    apply_common(args)
    model, tokenizer = load_model(args.model)
    ids = book_token_ids(tokenizer, spec["book"], spec["tokens"])
    cpu_started = time.process_time()  # all threads' CPU time: less sensitive than wall time to a busy machine
    chunk, context, extra = args.chunk, args.context, 0
    if spec["kind"] in ("eval", "long"):
        if spec["kind"] == "long":
            positions = model.config.max_position_embeddings
            chunk = min(args.long_chunk, positions // 2, len(ids))
            context = positions - chunk
        result = evaluate(model, tokenizer, ids, chunk_tokens=chunk, context_tokens=context)
    else:
        result = memorize_run(model, tokenizer, ids, spec, args)
        extra = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    # CPU time covers this process only: for a run resumed from a checkpoint, its last part
    cpu = time.process_time() - cpu_started
    return {"result": result.to_dict(), "extra_params": extra, "chunk": chunk, "context": context, "cpu_time_s": cpu}


def memorize_run(model, tokenizer, ids: list[int], spec: dict[str, Any], args: argparse.Namespace) -> MemorizeResult:
    """Memorise ``ids`` with the spec's adapter under the benchmark's protocol, checkpointing in ``--work`` (so a
    finished run is loaded back rather than repeated, also by `forgetting.py`)."""
    if spec["kind"] == "locas":
        peft_config, lr = LocasConfig(r=spec["r"], init_weights="data"), None
    else:
        peft_config, lr = templora_config(spec["r"]), spec["lr"]
    config = MemorizeConfig(
        chunk_tokens=args.chunk,
        context_tokens=args.context,
        steps_per_chunk=args.steps,
        lr=lr,
        init=spec.get("init"),
        seed=args.seed,
        checkpoint_dir=checkpoint_dir(spec, args),
        checkpoint_every=8,
        show_progress=sys.stderr.isatty(),
    )
    return memorize(model, tokenizer, ids, config, peft_config=peft_config)


def run_id(spec: dict[str, Any]) -> str:
    method = spec["method"].replace(" ", "_").replace("=", "")
    lr = f"_lr{spec['lr']:g}" if "lr" in spec else ""
    return f"{spec['book']}__{method}{lr}__{spec['tokens']}"


def checkpoint_dir(spec: dict[str, Any], args: argparse.Namespace) -> Path:
    return Path(args.work) / f"{run_id(spec)}.checkpoint"


def completed(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The run's record: read from ``--work`` when a run with the same settings finished, else run in a subprocess."""
    path = Path(args.work) / f"{run_id(spec)}.json"
    settings = protocol(args)
    if path.exists():
        record = json.loads(path.read_text())
        if record["spec"] == spec and record["settings"] == settings:
            return record
        print(f"{path.name}: other settings; discarding this run and its checkpoint, running again", flush=True)
        shutil.rmtree(checkpoint_dir(spec, args), ignore_errors=True)
    print(f"running {spec['method']} on {spec['book']} ({spec['tokens']} tokens)", flush=True)
    command = [sys.executable, __file__, "--run", json.dumps(spec), *child_arguments(args)]
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SystemExit(f"error: {spec['method']} on {spec['book']} failed (exit {done.returncode}); see above")
    return json.loads(path.read_text())


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that shape every run's numbers (a finished run is reused only under the same ones)."""
    keys = ("model", "chunk", "context", "long_chunk", "steps", "seed", "threads", "device", "dtype")
    return {key: getattr(args, key) for key in keys}


def child_arguments(args: argparse.Namespace) -> list[str]:
    values = {**protocol(args), "work": args.work}
    return list(
        itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in values.items() if v is not None)
    )


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: both perplexity aggregations, and cost relative to no memory and to LoRA."""
    by_method = {record["spec"]["method"]: record for record in records}
    reference, lora = by_method["no memory"]["result"], by_method.get(f"lora r={LORA_R}")
    rows = []
    for method, record in by_method.items():
        result = record["result"]
        rows.append(
            {
                "method": method,
                "ppl": result["perplexity"],
                "mean-chunk ppl": result["mean_chunk_perplexity"],
                "extra params": record["extra_params"],
                "params / lora": record["extra_params"] / lora["extra_params"] if lora else None,
                "time / no memory": result["wall_time_s"] / reference["wall_time_s"],
                "cpu / no memory": record["cpu_time_s"] / by_method["no memory"]["cpu_time_s"],
                "time / lora": result["wall_time_s"] / lora["result"]["wall_time_s"] if lora else None,
                "cpu / lora": record["cpu_time_s"] / lora["cpu_time_s"] if lora else None,
                "peak mem / no memory": result["peak_memory_bytes"] / reference["peak_memory_bytes"],
                "wall s": result["wall_time_s"],
            }
        )
    return rows


def plot(books: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Running prequential perplexity, and each chunk's loss gain over no memory, against the position in the book
    (one colour per method in every panel; the long window, chunked differently, has no per-chunk gain)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(books), 8), dpi=110, layout="constrained")
    axes = figure.subplots(2, len(books), squeeze=False)
    for column, (book, records) in enumerate(books.items()):
        reference = next(r for r in records if r["spec"]["method"] == "no memory")["result"]
        for index, record in enumerate(records):
            result = MemorizeResult.from_dict(record["result"])
            position = list(itertools.accumulate(result.token_counts))
            nll = list(
                itertools.accumulate(n * loss for n, loss in zip(result.token_counts, result.losses, strict=True))
            )
            style = {"linestyle": "--" if record["spec"]["kind"] in ("eval", "long") else "-", "color": f"C{index}"}
            label = f"{record['spec']['method']} ({result.perplexity:.2f})"
            running = [math.exp(s / p) for s, p in zip(nll, position, strict=True)]
            axes[0, column].plot(position, running, label=label, **style)
            if record["spec"]["kind"] != "eval" and result.token_counts == reference["token_counts"]:
                gain = [b - a for a, b in zip(result.losses, reference["losses"], strict=True)]
                axes[1, column].plot(position, moving_average(gain, 4), label=record["spec"]["method"], **style)
        axes[0, column].set_title(f"{book.replace('_', ' ')}: prequential perplexity so far")
        axes[1, column].set_title("loss gain over no memory per chunk (nats/token, 4-chunk mean)")
        axes[1, column].axhline(0, color="grey", linewidth=0.8)
        for ax in axes[:, column]:
            ax.set_xlabel("tokens read")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    figure.savefig(path)


def moving_average(values: list[float], width: int) -> list[float]:
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """How every method reads a book (shared with `forgetting.py`, which reuses these runs' memories)."""
    parser.add_argument("--chunk", type=int, default=512, help="tokens scored, then trained on, per chunk")
    parser.add_argument("--context", type=int, default=256, help="short window: prefix tokens given to each chunk")
    parser.add_argument("--long-chunk", type=int, default=2048, help="chunk of the long-window baseline")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per chunk")
    parser.add_argument("--work", default=None, help="per-run results and checkpoints (default under ~/.cache)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--books", default="pride_and_prejudice,persuasion", help="comma-separated prepared novels")
    parser.add_argument("--tokens", type=int, default=None, help="tokens read per book (default 16384, quick 2048)")
    parser.add_argument("--sweep-book", default="northanger_abbey", help="novel for the LoRA learning-rate sweep")
    parser.add_argument("--sweep-tokens", type=int, default=None, help="default 4096, quick 1024")
    parser.add_argument("--lora-lrs", default="5e-5,2e-4,1e-3,3e-3", help="LoRA learning rates tried in the sweep")
    add_protocol_arguments(parser)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    set_work(args, "book_ppl")
    if args.run is not None:
        spec = json.loads(args.run)
        record = {"spec": spec, "settings": protocol(args), **run_one(spec, args)}
        path = Path(args.work) / f"{run_id(spec)}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)
        return 0

    started = time.perf_counter()
    tokens = args.tokens or (2048 if args.quick else 16384)
    sweep_tokens = args.sweep_tokens or (1024 if args.quick else 4096)
    books = args.books.split(",")
    if args.sweep_book in books:
        parser.error(f"--sweep-book {args.sweep_book} is also benchmarked; tune LoRA on a different novel")
    sweep = {}
    for lr in learning_rates(parser, "--lora-lrs", args.lora_lrs):
        spec = {**lora_spec(lr), "book": args.sweep_book, "tokens": sweep_tokens}
        sweep[lr] = completed(spec, args)["result"]["perplexity"]
    lora_lr = min(sweep, key=sweep.get)
    print(f"LoRA lr sweep on {args.sweep_book}: {sweep}; chose {lora_lr:g}", flush=True)

    per_book = {}
    for book in books:
        per_book[book] = [completed({**spec, "book": book, "tokens": tokens}, args) for spec in method_specs(lora_lr)]
    tables = {}
    for book, records in per_book.items():
        tables[book] = summary_rows(records)
        print(f"\n{book}, {tokens} tokens, window {args.context}+{args.chunk}, {args.steps} steps per chunk:")
        print_table(tables[book], list(tables[book][0]))
    figure = figure_path("book_ppl", args)
    plot(per_book, figure)
    wall = time.perf_counter() - started
    results = {
        "tokens_per_book": tokens,
        "lora_lr_sweep": {
            "book": args.sweep_book,
            "tokens": sweep_tokens,
            "perplexity_by_lr": sweep,
            "chosen": lora_lr,
        },
        "tables": tables,
        "runs": per_book,
        "total_wall_time_s_of_runs": sum(r["result"]["wall_time_s"] for rs in per_book.values() for r in rs),
        "wall_time_s_of_this_invocation": wall,
        "plot": figure.name,
    }
    path = write_results("book_ppl", args, results)
    print(f"\nresults: {path}; plot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
