"""``MemorizeResult``: what a memorisation (or chunked evaluation) run measured, and its two perplexities.

Prequential perplexity is ``exp(total NLL / total tokens)``; TempLoRA reports instead the token-weighted mean of the
chunks' perplexities, which is never smaller (Jensen). Both are kept, so numbers compare with either literature.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from peft import PeftModel


@dataclass
class MemorizeResult:
    """Per-chunk prequential losses of a run and what it cost.

    ``losses[i]`` is the mean next-token NLL of chunk ``i`` (over ``token_counts[i]`` tokens) scored before training on
    it; ``baseline_losses[i]`` the same with the adapter disabled (when asked). ``train_losses[i]`` is the training
    objective's loss on chunk ``i`` (NTP: mean NLL; distillation: mean KL, plus the weighted NLL), averaged over its
    steps and each taken before its step's update (``None`` for evaluation, runs without training steps, and results
    saved before it existed). ``self_study[i]`` is what self-study generated and learnt on chunk ``i``
    (`peft_locas.engine.self_study`): ``{"questions": [{"question": ..., "answer": ...}, ...], "losses": [...]}``, the
    losses being each self-study step's mean KL per answer token before its update (``None`` without self-study).
    ``model`` is the trained ``PeftModel`` (not serialised), also when `memorize()` created
    it from a base model.
    """

    token_counts: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    baseline_losses: list[float] | None = None
    train_losses: list[float] | None = None
    self_study: list[dict[str, Any]] | None = None
    wall_time_s: float = 0.0
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    model: PeftModel | None = field(default=None, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def perplexity(self) -> float:
        """Prequential perplexity, ``exp(total NLL / total tokens)``."""
        return _perplexity(self.token_counts, self.losses)

    @property
    def mean_chunk_perplexity(self) -> float:
        """Token-weighted mean of the chunks' perplexities: what TempLoRA reports as "PPL" (>= ``perplexity``)."""
        return _mean_chunk_perplexity(self.token_counts, self.losses)

    @property
    def baseline_perplexity(self) -> float | None:
        return None if self.baseline_losses is None else _perplexity(self.token_counts, self.baseline_losses)

    @property
    def baseline_mean_chunk_perplexity(self) -> float | None:
        return None if self.baseline_losses is None else _mean_chunk_perplexity(self.token_counts, self.baseline_losses)

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data: the recorded fields, then the aggregates."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        aggregates = ("total_tokens", "perplexity", "mean_chunk_perplexity", "baseline_perplexity")
        aggregates += ("baseline_mean_chunk_perplexity", "tokens_per_s")
        return {**data, **{name: getattr(self, name) for name in aggregates}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemorizeResult:
        """Read the recorded fields back (aggregates are recomputed); older results may lack ``train_losses`` and
        ``self_study``."""
        optional = ("train_losses", "self_study")
        values = {f.name: data[f.name] for f in fields(cls) if f.name not in ("model", *optional)}
        return cls(**values, **{name: data.get(name) for name in optional})

    def add_chunk(
        self,
        tokens: int,
        loss: float,
        baseline_loss: float | None,
        wall_time_s: float,
        device: torch.device,
        train_loss: float | None = None,
        self_study: dict[str, Any] | None = None,
    ) -> None:
        """Record a scored chunk (and its training loss and self-study record, when recorded), and the run's time and
        peak memory so far (CUDA's when ``device`` is a GPU)."""
        self.token_counts.append(tokens)
        self.losses.append(loss)
        if self.baseline_losses is not None:
            self.baseline_losses.append(baseline_loss)
        if self.train_losses is not None:
            self.train_losses.append(train_loss)
        if self.self_study is not None:
            self.self_study.append(self_study)
        self.wall_time_s = wall_time_s
        peak, kind = _peak_memory(device)
        if peak is not None:
            self.peak_memory_bytes, self.peak_memory_kind = max(peak, self.peak_memory_bytes or 0), kind


def _perplexity(token_counts: Sequence[int], losses: Sequence[float]) -> float:
    return math.exp(sum(n * loss for n, loss in zip(token_counts, losses, strict=True)) / sum(token_counts))


def _mean_chunk_perplexity(token_counts: Sequence[int], losses: Sequence[float]) -> float:
    return sum(n * math.exp(loss) for n, loss in zip(token_counts, losses, strict=True)) / sum(token_counts)


def _peak_memory(device: torch.device) -> tuple[int | None, str | None]:
    """Peak CUDA memory allocated on the model's GPU, else the process's peak resident set (Linux/macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), "rss"
