"""Steps per chunk: prequential perplexity against training time for Locas and TempLoRA-style LoRA, at 1, 2 and 4
optimiser steps per chunk, on real novels read with a short window (`book_ppl.py`'s protocol).

Locas r=``--r`` ``top_k`` runs at its engine default learning rate (or, with ``--locas-lrs``, at the rate a sweep
picks as for LoRA); LoRA r=64 (TempLoRA's recipe) at the learning
rate a sweep picks *for each step count* (``--lora-lrs`` on ``--sweep-book``, a novel not benchmarked, lowest
prequential perplexity wins), since a step count can move LoRA's best rate. Every (book, method, steps) run is a
child process; the methods alternate in ``--rounds`` interleaved rounds (the order flips every round), so drift on a
shared machine hits all alike. Perplexity is deterministic (every round gives the same; the JSON keeps each round's
value to show it), times are medians over rounds with their range, and CPU time is reported beside wall time.

The target (issue: "at most half of TempLoRA's time at equal perplexity"), evaluated by `report.py`'s
`steps_target`: per book, the cheapest Locas setting whose perplexity is at or below LoRA's best takes at most 0.5x
of the CPU time of LoRA's best setting (stretch 0.4x). Finished measurements are kept in ``--work``, so a rerun of
the same command resumes where an interruption stopped. ``--jobs 2`` runs two measurements at a time (one per core
with ``--threads 1``); each run records how many shared the machine (``jobs``). SIGTERM to this process stops it from
starting new runs: the ones in flight finish and are kept, then it exits, ready to resume.

    python benchmarks/steps_pareto.py [--quick] [--tokens 16384] [--steps 1,2,4] [--rounds 3] [--threads 1] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    apply_common,
    book_token_ids,
    figure_path,
    finish,
    load_model,
    measure_in_child,
    placement_arguments,
    set_work,
    start_clock,
)
from report import steps_target

from peft_locas import LocasConfig, MemorizeConfig, memorize, templora_config

COLUMNS = ["book", "method", "steps", "lr", "ppl", "wall s", "wall range", "CPU s", "tok/s", "jobs"]


def measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: memorise the spec's book with its method and steps; perplexity and times."""
    model, tokenizer = load_model(args.model)
    ids = book_token_ids(tokenizer, spec["book"], spec["tokens"])
    if spec["method"] == "locas":
        peft_config = LocasConfig(r=args.r, init_weights="data")
    else:
        peft_config = templora_config(args.lora_r)
    config = MemorizeConfig(
        chunk_tokens=args.chunk,
        context_tokens=args.context,
        steps_per_chunk=spec["steps"],
        lr=spec["lr"],
        seed=args.seed,
    )
    started, cpu = time.perf_counter(), time.process_time()
    result = memorize(model, tokenizer, ids, config, peft_config=peft_config)
    return {
        "perplexity": result.perplexity,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "tokens": len(ids),
    }


class Runs:
    """Finished measurements in ``--work``, keyed by spec and round (a rerun of the same command resumes). Safe to call
    from several threads: the file is rewritten, atomically, under a lock as each run finishes. Once ``stop`` is set
    (SIGTERM), `get` starts no new run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        keys = ("model", "r", "lora_r", "chunk", "context", "seed", "threads", "device", "dtype")
        settings = {key: getattr(args, key) for key in keys}
        self.path = Path(args.work) / "steps_pareto_runs.json"
        self.stored = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.stored.get("settings") != settings:
            self.stored = {"settings": settings, "runs": {}}
        self.lock, self.stop = threading.Lock(), threading.Event()

    def get(self, spec: dict[str, Any], round_index: int) -> dict[str, Any]:
        """The spec's measurement in that round, measured now in a child process unless stored.

        Raises:
            SystemExit: ``stop`` is set and the run is not stored; or the child failed.
        """
        key = json.dumps({**spec, "round": round_index}, sort_keys=True)
        with self.lock:
            if key in self.stored["runs"]:
                return self.stored["runs"][key]
        if self.stop.is_set():
            raise SystemExit(f"stopped on SIGTERM; finished runs are kept in {self.path}: rerun the command to resume")
        run = {**self._child(spec), "jobs": self.args.jobs}
        with self.lock:
            self.stored["runs"][key] = run
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.stored))
            os.replace(tmp, self.path)
        return run

    def _child(self, spec: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        arguments = ["--measure", json.dumps(spec), "--model", args.model, "--r", str(args.r)]
        arguments += ["--lora-r", str(args.lora_r), "--chunk", str(args.chunk), "--context", str(args.context)]
        arguments += ["--seed", str(args.seed), *placement_arguments(args)]
        return measure_in_child(__file__, arguments, f"the run {spec}")


def sweep(runs: Runs, args: argparse.Namespace, steps: list[int], method: str, lrs: str) -> dict[int, dict[str, Any]]:
    """``method``'s learning rate per step count, out of the comma-separated ``lrs``: lowest prequential perplexity on
    the sweep book."""
    chosen = {}
    for count in steps:
        by_lr = {}
        for lr in (float(value) for value in lrs.split(",")):
            spec = {"book": args.sweep_book, "tokens": args.sweep_tokens, "method": method, "steps": count, "lr": lr}
            by_lr[lr] = runs.get(spec, 0)["perplexity"]
        best = min(by_lr, key=by_lr.get)
        chosen[count] = {"perplexity_by_lr": by_lr, "chosen": best}
        print(f"{method} lr sweep at {count} steps on {args.sweep_book}: {by_lr}; chose {best:g}", flush=True)
    return chosen


def measure_all(runs: Runs, specs: list[dict[str, Any]], rounds: int, jobs: int) -> dict[int, list[dict[str, Any]]]:
    """Every spec once per round, methods alternating and the order flipped every round, ``jobs`` runs at a time;
    returns each spec's runs in round order.

    Raises:
        SystemExit: a run failed, or SIGTERM stopped new runs; the runs in flight finish and are kept first.
    """
    todo: queue.Queue[tuple[int, int]] = queue.Queue()
    for round_index in range(rounds):
        for index in range(len(specs)) if round_index % 2 == 0 else reversed(range(len(specs))):
            todo.put((round_index, index))
    done: dict[tuple[int, int], dict[str, Any]] = {}
    errors: list[SystemExit] = []

    def worker() -> None:
        while not errors:
            try:
                round_index, index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                run = done[round_index, index] = runs.get(specs[index], round_index)
            except SystemExit as error:  # the other workers start nothing new; reported once they finish
                errors.append(error)
                return
            print(
                f"round {round_index + 1}/{rounds}, {specs[index]}: ppl {run['perplexity']:.3f}, "
                f"{run['seconds']:.0f} s (CPU {run['cpu_seconds']:.0f} s)",
                flush=True,
            )

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=1)  # bounded waits, so a SIGTERM handler runs promptly
    if errors:
        raise errors[0]
    return {index: [done[round_index, index] for round_index in range(rounds)] for index in range(len(specs))}


def summarise(spec: dict[str, Any], measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the perplexity (equal across rounds), median times and the rounds' range of wall time."""
    wall = [run["seconds"] for run in measured]
    return {
        "book": spec["book"],
        "method": spec["method"],
        "steps": spec["steps"],
        "lr": spec["lr"],
        "ppl": measured[0]["perplexity"],
        "ppl spread": max(run["perplexity"] for run in measured) - min(run["perplexity"] for run in measured),
        "wall s": statistics.median(wall),
        "wall range": f"{min(wall):.1f}-{max(wall):.1f}",
        "CPU s": statistics.median(run["cpu_seconds"] for run in measured),
        "tok/s": measured[0]["tokens"] / statistics.median(wall),
        # runs measured before --jobs existed ran one at a time
        "jobs": sorted({run.get("jobs", 1) for run in measured}),
        "runs": measured,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against CPU time, one panel per book, every run a point labelled with its steps per chunk."""
    from matplotlib.figure import Figure

    books = list(dict.fromkeys(row["book"] for row in rows))
    figure = Figure(figsize=(5.5 * len(books), 4.5), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(books), squeeze=False)[0]
    for ax, book in zip(axes, books, strict=True):
        for index, method in enumerate(("locas", "lora")):
            points = sorted(
                (row["CPU s"], row["ppl"], row["steps"])
                for row in rows
                if (row["book"], row["method"]) == (book, method)
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{index}", label=method)
            for cpu, ppl, steps in points:
                ax.annotate(f"{steps}", (cpu, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{book.replace('_', ' ')}: perplexity vs CPU time (labels: steps per chunk)", fontsize=9)
        ax.set_xlabel("CPU seconds (median over rounds)")
        ax.set_ylabel("prequential perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--books", default="pride_and_prejudice,persuasion", help="comma-separated prepared novels")
    parser.add_argument("--tokens", type=int, default=None, help="tokens read per book (default 16384, quick 1024)")
    parser.add_argument("--steps", default=None, help="steps per chunk compared (default 1,2,4; quick 1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--r", type=int, default=64, help="Locas memory width")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    parser.add_argument("--sweep-book", default="northanger_abbey", help="novel for LoRA's learning-rate sweeps")
    parser.add_argument("--sweep-tokens", type=int, default=None, help="default 2048, quick 512")
    parser.add_argument("--lora-lrs", default="5e-4,1e-3,2e-3", help="LoRA learning rates tried per step count")
    parser.add_argument(
        "--locas-lrs",
        default=None,
        help="Locas learning rates tried per step count, as LoRA's (default: none, the engine's 4e-3 throughout)",
    )
    parser.add_argument("--chunk", type=int, default=512, help="tokens scored, then trained on, per chunk")
    parser.add_argument("--context", type=int, default=256, help="short window: prefix tokens given to each chunk")
    parser.add_argument("--work", default=None, help="finished measurements (default under ~/.cache)")
    parser.add_argument("--jobs", type=int, default=1, help="runs measured at a time (at most one per core)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)
    apply_common(args)
    if args.measure is not None:
        print(json.dumps(measure(json.loads(args.measure), args)))
        return 0
    args.tokens = args.tokens or (1024 if args.quick else 16384)
    args.sweep_tokens = args.sweep_tokens or (512 if args.quick else 2048)
    steps = [int(value) for value in (args.steps or ("1,2" if args.quick else "1,2,4")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    books = args.books.split(",")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: measure at least one run at a time")
    if args.sweep_book in books:
        parser.error(f"--sweep-book {args.sweep_book} is also benchmarked; tune LoRA on a different novel")
    set_work(args, "steps_pareto")
    start_clock(args)
    runs = Runs(args)
    signal.signal(signal.SIGTERM, lambda *_: runs.stop.set())
    lora_sweep = sweep(runs, args, steps, "lora", args.lora_lrs)
    locas_sweep = sweep(runs, args, steps, "locas", args.locas_lrs) if args.locas_lrs else None
    specs = [
        {"book": book, "tokens": args.tokens, "method": method, "steps": count, "lr": lr}
        for book in books
        for count in steps
        for method, lr in (
            ("locas", locas_sweep[count]["chosen"] if locas_sweep else None),
            ("lora", lora_sweep[count]["chosen"]),
        )
    ]
    measured = measure_all(runs, specs, rounds, args.jobs)
    rows = [summarise(spec, measured[index]) for index, spec in enumerate(specs)]
    targets = [steps_target(book, rows) for book in books]
    for target in targets:
        print(target["summary"])
    figure = figure_path("steps_pareto", args)
    plot(rows, figure)
    extra = {"tokens_per_book": args.tokens, "rounds": rounds, "r": args.r, "lora_r": args.lora_r, "plot": figure.name}
    extra |= {"lora_lr_sweep": lora_sweep, "targets": targets}
    if locas_sweep:
        extra["locas_lr_sweep"] = locas_sweep
    return finish("steps_pareto", args, rows, COLUMNS, extra)


if __name__ == "__main__":
    sys.exit(main())
