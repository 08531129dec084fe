"""A picture of a memorisation run: per-chunk loss with and without the memory."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from .results import MemorizeResult


def plot_losses(result: MemorizeResult, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Save a PNG of each chunk's prequential loss (and the no-memory baseline's, when recorded) against the tokens
    read so far. Uses matplotlib's object API (Agg canvas), so no display and no global backend state is involved."""
    from matplotlib.figure import Figure

    position = list(itertools.accumulate(result.token_counts))
    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    axes = figure.subplots()
    axes.plot(position, result.losses, marker=".", label=f"with memory (prequential PPL {result.perplexity:.2f})")
    if result.baseline_losses is not None:
        label = f"without memory (PPL {result.baseline_perplexity:.2f})"
        axes.plot(position, result.baseline_losses, marker=".", color="grey", label=label)
    axes.set_xlabel("tokens read")
    axes.set_ylabel("chunk loss (mean NLL, nats/token)")
    axes.set_title(title or "Loss of each chunk, scored before training on it")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    figure.savefig(path)
    return path
