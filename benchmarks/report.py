"""Render the committed benchmark results as the Markdown tables of the docs' results page.

Every number on ``docs/benchmarks.md`` comes from ``benchmarks/results/*.json`` through this script (the page includes
the files it writes), and ``tests/test_benchmarks.py`` checks that the committed tables match the committed results.
Targets of the benchmark issue are evaluated here too, so "met" or "missed" is computed, never typed.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/benchmark-results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"


def table(rows: list[dict[str, Any]], columns: dict[str, Callable[[Any], str] | None]) -> str:
    """A Markdown table of ``rows``; ``columns`` maps each key to a formatter (``None``: ``str``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [(format_ or str)(row[key]) if row.get(key) is not None else "-" for key, format_ in columns.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def signed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:+.{digits}f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def millions(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value else "0"


def percent(value: float) -> str:
    return f"{100 * value:+.2f}%"


def title(slug: str) -> str:
    return " ".join(word if word in ("and", "of") else word.capitalize() for word in slug.split("_"))


def source_line(result: dict[str, Any], name: str) -> str:
    machine = result.get("machine", {})
    arguments = " ".join(
        f"--{key.replace('_', '-')}" + ("" if value == "True" else f" {value}")
        for key, value in result.get("arguments", {}).items()
        if value not in ("None", "False") and key not in ("out", "run")
    )
    return (
        f"*From `benchmarks/results/{name}.json` (finished {result.get('finished', '?')}; "
        f"`python benchmarks/{name}.py {arguments}`; torch {machine.get('torch', '?')}, "
        f"{machine.get('torch_threads', '?')} CPU threads).*\n"
    )


def book_ppl_tables(result: dict[str, Any]) -> str:
    columns = {
        "method": None,
        "ppl": fixed(2),
        "mean-chunk ppl": fixed(2),
        "extra params": millions,
        "params / lora": ratio,
        "time / no memory": ratio,
        "time / lora": ratio,
        "cpu / lora": ratio,
        "peak mem / no memory": ratio,
    }
    parts = [source_line(result, "book_ppl")]
    for book, rows in result["tables"].items():
        parts.append(f"\n**{title(book)}**, first {result['tokens_per_book']:,} tokens:\n\n")
        parts.append(table(rows, columns))
    sweep = result["lora_lr_sweep"]
    sweep_rows = [{"lr": lr, "ppl": ppl} for lr, ppl in sweep["perplexity_by_lr"].items()]
    parts.append(
        f"\nLoRA learning-rate sweep on {title(sweep['book'])} (first {sweep['tokens']:,} tokens; "
        f"chosen: {sweep['chosen']:g}):\n\n"
    )
    parts.append(table(sweep_rows, {"lr": None, "ppl": fixed(3)}))
    total = result["total_wall_time_s_of_runs"]
    parts.append(f"\nWall time of all book runs: {total / 60:.0f} min (the LoRA sweep not included).\n")
    return "".join(parts)


def forgetting_table(result: dict[str, Any]) -> str:
    columns = {
        "model": None,
        "gold loglik": fixed(3),
        "gold loglik change": signed(3),
        "accuracy": fixed(3),
        "accuracy change": signed(3),
        "accuracy (norm)": fixed(3),
        "held-out ppl": fixed(2),
        "held-out ppl change": percent,
    }
    intro = (
        f"After memorising the first {result['tokens']:,} tokens of {title(result['book'])}; "
        f"{result['questions']} MMLU questions; held-out text: the first {result['heldout_tokens']:,} tokens of "
        f"{title(result['heldout'])}; LoRA lr {result['lora_lr']:g}.\n\n"
    )
    return source_line(result, "forgetting") + "\n" + intro + table(result["rows"], columns)


def overhead_tables(result: dict[str, Any]) -> str:
    inference = {
        "variant": None,
        "tokens/s": fixed(0),
        "time vs base": fixed(3),
        "arithmetic limit": fixed(3),
        "extra params": millions,
    }
    training = {"variant": None, "step seconds": fixed(2), "vs lora": ratio, "trainable params": millions}
    training["params + AdamW state MB"] = fixed(1)
    return (
        source_line(result, "overhead")
        + "\n"
        + table(result["inference"], inference)
        + "\nOne training step (forward, backward, AdamW):\n\n"
        + table(result["training"], training)
        + f"\n`init_locas_weights` costs {result['init_vs_forward']:.2f}x one plain forward over the same tokens.\n"
    )


def merge_fidelity_table(result: dict[str, Any]) -> str:
    columns = {
        "setting": None,
        "max abs diff": fixed(5),
        "mean abs diff": fixed(6),
        "memory effect (mean abs)": fixed(4),
        "effect kept": fixed(3),
        "effect kept per block": fixed(3),
        "kernel noise (max abs)": fixed(4),
    }
    return source_line(result, "merge_fidelity") + "\n" + table(result["rows"], columns)


def init_ablation_table(result: dict[str, Any]) -> str:
    rows = [{"method": method, "loss": loss} for method, loss in result["mean_next_chunk_loss"].items()]
    no_memory = sum(run["no_memory"] for run in result["runs"]) / len(result["runs"])
    rows.append({"method": "no memory", "loss": no_memory})
    settings = result["settings"]
    return (
        source_line(result, "init_ablation")
        + f"\nr={settings['r']}, {settings['chunk']}-token chunks, {settings['steps']} steps, "
        + f"offsets {settings['offsets']}:\n\n"
        + table(sorted(rows, key=lambda row: row["loss"]), {"method": None, "loss": fixed(4)})
    )


def targets_table(results: dict[str, dict[str, Any]]) -> str:
    """Each target of the benchmark issue beside its measurement, and whether it is met."""
    rows = []

    def add(target: str, measured: str, met: bool) -> None:
        rows.append({"target": target, "measured": measured, "met": "yes" if met else "**no**"})

    for book, table_rows in results["book_ppl"]["tables"].items():
        by = {row["method"]: row for row in table_rows}
        locas, lora, gaussian = by["locas r=64 top_k"], by["lora r=64"], by["locas r=64 gaussian"]
        name = title(book)
        add(
            f"{name}: Locas r=64 PPL <= LoRA r=64",
            f"{locas['ppl']:.2f} vs {lora['ppl']:.2f}",
            locas["ppl"] <= lora["ppl"],
        )
        add(f"{name}: extra params <= 1/5 of LoRA's", ratio(locas["params / lora"]), locas["params / lora"] <= 0.2)
        times = f"wall {ratio(locas['time / lora'])}, CPU {ratio(locas['cpu / lora'])}"
        add(f"{name}: time <= 1/2 of LoRA's", times, max(locas["time / lora"], locas["cpu / lora"]) <= 0.5)
        add(
            f"{name}: top_k PPL < gaussian PPL",
            f"{locas['ppl']:.2f} vs {gaussian['ppl']:.2f}",
            locas["ppl"] < gaussian["ppl"],
        )
    if "forgetting" in results:
        by = {row["model"]: row for row in results["forgetting"]["rows"]}
        for state in ("unmerged", "merged"):
            locas, lora = by[f"locas r=64 top_k {state}"], by[f"lora r=64 {state}"]
            for key, label, worse, show in (
                ("gold loglik change", "MMLU gold log-likelihood", -1, signed(3)),
                ("held-out ppl change", "held-out perplexity", 1, percent),
            ):
                # what was lost: a change in the worse direction (an improvement loses nothing)
                lost = {name: max(0.0, worse * row[key]) for name, row in (("locas", locas), ("lora", lora))}
                measured = f"change {show(locas[key])} vs {show(lora[key])}"
                add(f"forgetting ({state}): {label} lost, Locas <= LoRA", measured, lost["locas"] <= lost["lora"])
    by = {row["variant"]: row for row in results["overhead"]["inference"]}
    locas, lora = by["locas r=64"], by["lora r=64"]
    overhead = f"{percent(locas['time vs base'] - 1)} (LoRA {percent(lora['time vs base'] - 1)})"
    add("inference overhead of unmerged Locas r=64 <= 10%", overhead, locas["time vs base"] <= 1.10)
    add("... and below LoRA r=64's", overhead, locas["time vs base"] < lora["time vs base"])
    return table(rows, {"target": None, "measured": None, "met": None})


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "book_ppl": book_ppl_tables,
    "forgetting": forgetting_table,
    "overhead": overhead_tables,
    "merge_fidelity": merge_fidelity_table,
    "init_ablation": init_ablation_table,
}


def render(results_dir: Path, out: Path) -> list[Path]:
    """Write one Markdown file per available result (and the targets table, the book_ppl plot); return them."""
    results = {
        name: json.loads((results_dir / f"{name}.json").read_text())
        for name in RENDERERS
        if (results_dir / f"{name}.json").exists()
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in results.items():
        written.append(out / f"{name}.md")
        written[-1].write_text(RENDERERS[name](result))
    if {"book_ppl", "overhead"} <= results.keys():
        written.append(out / "targets.md")
        written[-1].write_text(targets_table(results))
    if (results_dir / "book_ppl.png").exists():
        written.append(out / "book_ppl.png")
        shutil.copyfile(results_dir / "book_ppl.png", written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=DOCS / "benchmark-results")
    args = parser.parse_args(argv)
    for path in render(args.results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
