"""LoCoMo scores pooled over questions: per setting and category (F1, gold log-likelihood, with standard errors),
over the questions whose evidence lies outside the window, paired differences between settings, the printed tables
and the plot. Pure bookkeeping over the answer records `locomo.py` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft_locas.recall.metrics import CATEGORIES, mean_with_stderr


def stats(values: list[float]) -> dict[str, Any]:
    """``{n, mean, stderr}`` (mean and stderr None for no values)."""
    if not values:
        return {"n": 0, "mean": None, "stderr": None}
    mean, stderr = mean_with_stderr(values)
    return {"n": len(values), "mean": mean, "stderr": stderr}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """F1 and gold log-likelihood over all questions, those outside the window, and per category."""

    def both(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"f1": stats([r["f1"] for r in items]), "loglik": stats([r["loglik"] for r in items])}

    categories = sorted({r["category"] for r in records}, key=str)
    return {
        "all": both(records),
        "outside": both([r for r in records if r["outside"]]),
        "categories": {str(c): both([r for r in records if r["category"] == c]) for c in categories},
    }


def comparisons(memories: list[str]) -> list[tuple[str, str, str]]:
    """``(setting a, setting b, subset)``: a memory against no memory, and each Locas memory against LoRA, paired per
    question. Short and long windows are compared on the questions outside them, no dialogue on all."""
    pairs = []
    for memory in memories:
        pairs += [(f"short+{memory}", "short", "outside"), (f"none+{memory}", "none", "all")]
        pairs += [(f"long+{memory}", "long", "outside")]
    for memory in [m for m in memories if m.startswith("locas")] if "lora" in memories else []:
        pairs += [(f"short+{memory}", "short+lora", "outside"), (f"none+{memory}", "none+lora", "all")]
        pairs += [(f"long+{memory}", "long+lora", "all")]
    return pairs


def paired(records: dict[str, list[dict[str, Any]]], a: str, b: str, subset: str) -> dict[str, Any]:
    """Mean and standard error of the per-question differences a - b (gold log-likelihood and F1)."""
    by_b = {(r["sample"], r["key"]): r for r in records[b]}
    pairs = [(r, by_b[(r["sample"], r["key"])]) for r in records[a] if (r["sample"], r["key"]) in by_b]
    if subset == "outside":
        pairs = [(x, y) for x, y in pairs if x["outside"] and y["outside"]]
    return {
        "a": a,
        "b": b,
        "subset": subset,
        "loglik": stats([x["loglik"] - y["loglik"] for x, y in pairs]),
        "f1": stats([x["f1"] - y["f1"] for x, y in pairs]),
    }


def aggregate(runs: list[dict[str, Any]], memories: list[str]) -> dict[str, Any]:
    """Per dataset (LoCoMo, probe): every setting's summary and the paired comparisons, over all its conversations,
    and (``paired_by_conversation``) the same comparisons within each conversation, where there are several: pooled
    differences can hide conversations that go opposite ways."""
    datasets: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for run in runs:
        datasets.setdefault(run["info"]["dataset"], {})[run["info"]["sample"]] = run["records"]
    pairs, summaries = comparisons(memories), {}
    for dataset, conversations in datasets.items():
        pooled: dict[str, list[dict[str, Any]]] = {}
        for records in conversations.values():
            for name, items in records.items():
                pooled.setdefault(name, []).extend(items)
        summaries[dataset] = {
            "settings": {name: summarize(items) for name, items in pooled.items()},
            "paired": [paired(pooled, a, b, subset) for a, b, subset in pairs],
            "paired_by_conversation": {
                sample: [paired(records, a, b, subset) for a, b, subset in pairs]
                for sample, records in conversations.items()
            }
            if len(conversations) > 1
            else {},
        }
    return summaries


def with_error(entry: dict[str, Any], scale: float = 1.0) -> str | None:
    if entry["mean"] is None:
        return None
    return f"{scale * entry['mean']:.3f} ± {scale * entry['stderr']:.3f}"


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in summary["settings"].items():
        rows.append(
            {
                "setting": name,
                "n": entry["all"]["f1"]["n"],
                "F1": with_error(entry["all"]["f1"], 100),
                "gold loglik/token": with_error(entry["all"]["loglik"]),
                "outside n": entry["outside"]["f1"]["n"],
                "outside F1": with_error(entry["outside"]["f1"], 100),
                "outside loglik": with_error(entry["outside"]["loglik"]),
            }
        )
    return rows


def category_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in summary["settings"].items():
        row = {"setting": name}
        for category, scores in entry["categories"].items():
            label = f"{category} {CATEGORIES.get(int(category), '?')} (n={scores['f1']['n']})"
            row[label] = with_error(scores["f1"], 100)
        rows.append(row)
    return rows


def paired_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "a - b": f"{item['a']} - {item['b']}",
            "questions": item["subset"],
            "n": item["loglik"]["n"],
            "loglik diff": with_error(item["loglik"]),
            "F1 diff": with_error(item["f1"], 100),
        }
        for item in summary["paired"]
    ]


def plot(datasets: dict[str, Any], path: Path) -> None:
    """Per dataset: gold log-likelihood per token (all questions and those outside the window) and F1, with standard
    errors, for every setting."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.2 * len(datasets)), dpi=110, layout="constrained")
    axes = figure.subplots(len(datasets), 2, squeeze=False)
    for row, (dataset, summary) in enumerate(datasets.items()):
        names = list(summary["settings"])
        positions = range(len(names))
        for offset, subset, colour in ((-0.2, "all", "C0"), (0.2, "outside", "C1")):
            for column, metric, scale in ((0, "loglik", 1.0), (1, "f1", 100.0)):
                entries = [summary["settings"][name][subset][metric] for name in names]
                means = [scale * e["mean"] if e["mean"] is not None else float("nan") for e in entries]
                errors = [scale * e["stderr"] if e["stderr"] is not None else 0.0 for e in entries]
                label = "all questions" if subset == "all" else "evidence outside the window"
                axes[row, column].bar(
                    [p + offset for p in positions], means, 0.4, yerr=errors, color=colour, label=label, capsize=2
                )
        for column, title in ((0, "gold answer log-likelihood per token"), (1, "LoCoMo F1 (x100)")):
            ax = axes[row, column]
            ax.set_title(f"{dataset}: {title}")
            ax.set_xticks(list(positions), names, rotation=45, ha="right", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    figure.savefig(path)
