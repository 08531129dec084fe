"""Steps per chunk: prequential perplexity against training time for Locas and TempLoRA-style LoRA, at 1, 2 and 4
optimiser steps per chunk, on real novels read with a short window (`book_ppl.py`'s protocol).

Locas r=``--r`` ``top_k`` runs at its engine default learning rate (or, with ``--locas-lrs``, at the rate a sweep
picks as for LoRA); LoRA r=64 (TempLoRA's recipe) at the learning
rate a sweep picks *for each step count* (``--lora-lrs`` on ``--sweep-book``, a novel not benchmarked, lowest
prequential perplexity wins), since a step count can move LoRA's best rate. ``--methods`` chooses the adapters
(default ``locas,lora``); ``lora_mlp``, the same LoRA on the MLP projections only (where a Locas memory sits), is an
ablation swept as LoRA is, asking whether LoRA's edge comes from adapting attention. Every (book, method, steps) run
is a child process; the methods alternate in ``--rounds`` interleaved rounds (the order flips every round), so drift
on a shared machine hits all alike. Perplexity is deterministic (every round gives the same; the JSON keeps each round's
value to show it), times are medians over rounds with their range, and CPU time is reported beside wall time.

The target (issue: "at most half of TempLoRA's time at equal perplexity"), evaluated by `report.py`'s
`steps_target`: per book, the cheapest Locas setting whose perplexity is at or below LoRA's best takes at most 0.5x
of the time of LoRA's best setting, by CPU and by wall time (stretch 0.4x). Finished measurements are kept in
``--work``, so a rerun of the same command resumes where an interruption stopped (with other settings it refuses to
touch them: pass another ``--work``).

``--jobs 2`` measures two runs at a time (with ``--threads 1``, one per core; the learning-rate sweeps still run one at
a time). A run beside another takes longer, by CPU time too (shared caches and memory bandwidth), so each run records
``jobs``, the most runs measured at once while it ran, and the table shows them. With ``--threads 1`` on the CPU, a
timed run whose CPU time is less than 90% of its wall time (something else ran beside it) is measured again, three
attempts in all at most, keeping the attempt that had its core most (``attempts`` in the JSON); a resume judges the
stored runs the same way; the sweeps, which count only for their perplexity, are measured once. SIGTERM or SIGINT to
this process alone (its pid is printed first) stops it from starting new runs or attempts: the ones in flight finish and
are kept, then it exits with status 1, ready to resume (if every run had already started, it finishes instead). Ctrl-C
in a terminal signals the children too, and their runs are lost.

    python benchmarks/steps_pareto.py [--quick] [--tokens 16384] [--steps 1,2,4] [--rounds 3] [--threads 1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
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
    learning_rates,
    load_model,
    measure_in_child,
    placement_arguments,
    set_work,
    start_clock,
)
from report import steps_target

from peft_locas import LocasConfig, MemorizeConfig, memorize, templora_config

#: a run whose CPU time is less than this share of its wall time (times --threads) did not have its cores to itself
MIN_CORE_SHARE = 0.9
#: how many times such a run is measured in all before the attempt with the largest share is kept
MAX_ATTEMPTS = 3
COLUMNS = ["book", "method", "steps", "lr", "ppl", "wall s", "wall range", "CPU s", "tok/s", "jobs"]
#: the benchmark model's (SmolLM2, a Llama) MLP projections: the layers a Locas memory sits beside
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
#: the adapters compared, by ``--methods`` name: Locas r=``--r`` (data-driven init), TempLoRA's LoRA r=``--lora-r`` on
#: every linear layer, and the same LoRA on the MLP projections only (an ablation: is LoRA's edge its attention?)
ADAPTERS = {
    "locas": lambda args: LocasConfig(r=args.r, init_weights="data"),
    "lora": lambda args: templora_config(args.lora_r),
    "lora_mlp": lambda args: dataclasses.replace(templora_config(args.lora_r), target_modules=MLP_PROJECTIONS),
}


def measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: memorise the spec's book with its method and steps; perplexity and times."""
    model, tokenizer = load_model(args.model)
    ids = book_token_ids(tokenizer, spec["book"], spec["tokens"])
    peft_config = ADAPTERS[spec["method"]](args)
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
    from several threads: the file is rewritten, atomically, under a lock as each run finishes. Once ``stopping`` is
    set (by a signal handler: a plain flag, since an `Event` takes a lock a second signal could wait on forever),
    `get` starts no new run.

    Raises:
        SystemExit: ``--work`` holds runs measured with other settings, or another invocation is measuring into it.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        keys = ("model", "r", "lora_r", "chunk", "context", "seed", "threads", "device", "dtype")
        settings = {key: getattr(args, key) for key in keys}
        self.path = Path(args.work) / "steps_pareto_runs.json"
        self._hold_work(Path(args.work))
        self.stored = json.loads(self.path.read_text()) if self.path.exists() else {"settings": settings, "runs": {}}
        if self.stored["settings"] != settings:
            there = self.stored["settings"]
            differ = ", ".join(
                f"--{key.replace('_', '-')} {there[key]}" if there.get(key) is not None else f"no --{key}"
                for key in keys
                if there.get(key) != settings[key]
            )
            raise SystemExit(
                f"error: {self.path} holds runs measured with {differ}: rerun with those to resume them, or pass "
                "another --work"
            )
        self.lock, self.stopping = threading.Lock(), False
        self.in_flight: dict[str, int] = {}  # run key -> the most runs measured at once while it ran

    def _hold_work(self, work: Path) -> None:
        """An exclusive lock on ``work`` for this process's life: two invocations would overwrite each other's runs."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one invocation per --work is then the user's to keep
            return
        self._lock_file = (work / "steps_pareto.lock").open("w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"error: another steps_pareto.py is measuring into {work}: let it finish, or pass another --work"
            ) from None

    def get(self, spec: dict[str, Any], round_index: int, timed: bool = True) -> dict[str, Any]:
        """The spec's measurement in that round, measured now in a child process unless stored and settled: a
        ``timed`` run that had its cores for less than `MIN_CORE_SHARE` of its wall time (something else ran) is
        measured again, up to `MAX_ATTEMPTS` times in all, and the attempt with the largest share is kept
        (``attempts`` counts them). Untimed runs (the sweeps: only their perplexity counts) are measured once.

        Raises:
            SystemExit: ``stopping`` is set and the run is not settled; or the child failed.
        """
        key = json.dumps({**spec, "round": round_index}, sort_keys=True)
        while True:
            with self.lock:
                stored = self.stored["runs"].get(key)
                if stored is not None and (not timed or self.settled(stored)):
                    return stored
                if self.stopping:
                    raise SystemExit(f"stopped by a signal; finished runs are kept in {self.path}: rerun to resume")
                self.in_flight[key] = len(self.in_flight) + 1
                for other in self.in_flight:
                    self.in_flight[other] = max(self.in_flight[other], len(self.in_flight))
            try:
                measured = self._child(spec)
            finally:
                with self.lock:
                    jobs = self.in_flight.pop(key)
            run = {**measured, "jobs": jobs}
            if stored is not None and self.core_share(stored) >= self.core_share(run):
                run = stored  # the earlier attempt had its cores more
            run = {**run, "attempts": (stored.get("attempts", 1) if stored is not None else 0) + 1}
            if not self.settled(run):
                print(
                    f"{spec} had its core for {self.core_share(measured):.0%} of its wall time: measuring it again "
                    f"(attempt {run['attempts'] + 1} of {MAX_ATTEMPTS})",
                    flush=True,
                )
            with self.lock:
                self.stored["runs"][key] = run
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.stored))
                os.replace(tmp, self.path)

    def core_share(self, run: dict[str, Any]) -> float:
        """The run's CPU time over its wall time: about 1 when a one-thread CPU run had its core to itself. Judged only
        with ``--threads 1`` on the CPU (1.0 otherwise): with more threads a run's serial parts keep it below 1
        alone, and on a GPU the CPU waits."""
        judged = self.args.threads == 1 and self.args.device == "cpu"
        return run["cpu_seconds"] / run["seconds"] if judged else 1.0

    def settled(self, run: dict[str, Any]) -> bool:
        return self.core_share(run) >= MIN_CORE_SHARE or run.get("attempts", 1) >= MAX_ATTEMPTS

    def _child(self, spec: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        arguments = ["--measure", json.dumps(spec), "--model", args.model, "--r", str(args.r)]
        arguments += ["--lora-r", str(args.lora_r), "--chunk", str(args.chunk), "--context", str(args.context)]
        arguments += ["--seed", str(args.seed), *placement_arguments(args)]
        return measure_in_child(__file__, arguments, f"the run {spec}")


def sweep(
    runs: Runs, args: argparse.Namespace, steps: list[int], method: str, lrs: list[float]
) -> dict[int, dict[str, Any]]:
    """``method``'s learning rate per step count, out of ``lrs``: lowest prequential perplexity on the sweep book."""
    chosen = {}
    for count in steps:
        by_lr = {}
        for lr in lrs:
            spec = {"book": args.sweep_book, "tokens": args.sweep_tokens, "method": method, "steps": count, "lr": lr}
            by_lr[lr] = runs.get(spec, 0, timed=False)["perplexity"]
        best = min(by_lr, key=by_lr.get)
        chosen[count] = {"perplexity_by_lr": by_lr, "chosen": best}
        print(f"{method} lr sweep at {count} steps on {args.sweep_book}: {by_lr}; chose {best:g}", flush=True)
    return chosen


def chosen_lr(sweeps: dict[str, dict[int, dict[str, Any]]], method: str, steps: int) -> float | None:
    """The rate ``method``'s sweep chose for ``steps`` per chunk; ``None`` (the engine's default) when not swept."""
    return sweeps[method][steps]["chosen"] if method in sweeps else None


def measure_all(runs: Runs, specs: list[dict[str, Any]], rounds: int, jobs: int) -> dict[int, list[dict[str, Any]]]:
    """Every spec once per round, methods alternating and the order flipped every round, ``jobs`` runs at a time;
    returns each spec's runs in round order.

    Raises:
        SystemExit: a run failed, or a signal stopped new runs; the runs in flight finish and are kept first.
        Exception: whatever else a worker raised (the first), once the others finish.
    """
    todo: queue.Queue[tuple[int, int]] = queue.Queue()
    for round_index in range(rounds):
        for index in range(len(specs)) if round_index % 2 == 0 else reversed(range(len(specs))):
            todo.put((round_index, index))
    done: dict[tuple[int, int], dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            try:
                round_index, index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                run = done[round_index, index] = runs.get(specs[index], round_index)
            except BaseException as error:  # raised once the others finish, which start nothing new, no repeat either
                errors.append(error)
                runs.stopping = True
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


def stop_on_signals(runs: Runs) -> dict[int, Any]:
    """SIGTERM and SIGINT set ``runs.stopping`` (no new run starts; those in flight finish and are kept); returns the
    handlers they replace, by signal number."""
    return {
        stop: signal.signal(stop, lambda *_: setattr(runs, "stopping", True))
        for stop in (signal.SIGTERM, signal.SIGINT)
    }


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
        for index, method in enumerate(dict.fromkeys(row["method"] for row in rows)):
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
    parser.add_argument(
        "--methods",
        default="locas,lora",
        help=f"adapters compared, of {', '.join(ADAPTERS)} (lora_mlp: LoRA on the MLP only, swept as LoRA is)",
    )
    parser.add_argument(
        "--sweep-book",
        default="northanger_abbey",
        help="novel for the learning-rate sweeps (LoRA's, and Locas's with --locas-lrs)",
    )
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs measured at a time, with --threads 1 at most one per core (SIGTERM to the printed pid stops after "
        "the runs in flight)",
    )
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
    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in ADAPTERS]
    if unknown or len(set(methods)) != len(methods):
        parser.error(f"--methods {args.methods}: give each of {', '.join(ADAPTERS)} at most once")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: measure at least one run at a time")
    lora_lrs = learning_rates(parser, "--lora-lrs", args.lora_lrs)
    locas_lrs = learning_rates(parser, "--locas-lrs", args.locas_lrs) if args.locas_lrs else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.jobs * (args.threads or cores) > cores:
        print(
            f"warning: --jobs {args.jobs} with {args.threads or 'all'} threads each asks for more than the {cores} "
            "cores: the runs slow each other (give --threads 1 and at most one job per core)",
            file=sys.stderr,
        )
    if args.sweep_book in books:
        parser.error(f"--sweep-book {args.sweep_book} is also benchmarked; tune LoRA on a different novel")
    set_work(args, "steps_pareto")
    start_clock(args)
    runs = Runs(args)
    stop_on_signals(runs)
    print(
        f"steps_pareto.py: pid {os.getpid()}, runs kept in {runs.path}; `kill {os.getpid()}` stops it after the "
        "runs in flight",
        flush=True,
    )
    # every LoRA variant is swept over --lora-lrs; Locas over --locas-lrs, or runs at the engine's rate
    sweeps = {
        method: sweep(runs, args, steps, method, locas_lrs if method == "locas" else lora_lrs)
        for method in methods
        if method != "locas" or locas_lrs
    }
    specs = [
        {"book": book, "tokens": args.tokens, "method": method, "steps": count, "lr": chosen_lr(sweeps, method, count)}
        for book in books
        for count in steps
        for method in methods
    ]
    measured = measure_all(runs, specs, rounds, args.jobs)
    rows = [summarise(spec, measured[index]) for index, spec in enumerate(specs)]
    targets = [steps_target(book, rows) for book in books] if {"locas", "lora"} <= set(methods) else []
    for target in targets:
        print(target["summary"])
    figure = figure_path("steps_pareto", args)
    plot(rows, figure)
    extra = {"tokens_per_book": args.tokens, "rounds": rounds, "r": args.r, "lora_r": args.lora_r, "plot": figure.name}
    extra |= {f"{method}_lr_sweep": chosen for method, chosen in sweeps.items()} | {"targets": targets}
    return finish("steps_pareto", args, rows, COLUMNS, extra)


if __name__ == "__main__":
    sys.exit(main())
