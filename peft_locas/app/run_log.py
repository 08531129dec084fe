"""What a long ``memorize`` run tells its user: the plan before the model loads (tokens, chunks), an estimate of the
time left once a chunk has been timed, and one JSON line per chunk appended to ``chunks.jsonl`` beside the
checkpoints, so a run can be followed (``tail -f``) and examined after a crash."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

#: the per-chunk log's file name, in the checkpoint folder (and copied into the adapter folder at the end)
CHUNK_LOG = "chunks.jsonl"


def plan_line(
    label: str, num_tokens: int, num_chunks: int, args: Any, checkpoint_dir: Path | None, per_text: bool = False
) -> str:
    """One line saying what the run will do, printed before the model loads; with ``per_text`` (texts memorised side
    by side), ``num_chunks`` is the longest text's count."""
    where = f"checkpoints and {CHUNK_LOG} in {checkpoint_dir}" if checkpoint_dir is not None else "no checkpoints"
    chunks = f"{num_chunks} {'chunk' if num_chunks == 1 else 'chunks'}"
    chunks = f"at most {chunks} per text" if per_text else chunks
    steps = f"{args.steps_per_chunk} training {'step' if args.steps_per_chunk == 1 else 'steps'}"
    return (
        f"memorize: {num_tokens:,} tokens of {label} in {chunks} of up to {args.chunk_tokens} tokens "
        f"({args.context_tokens}-token prefix, {steps} each); {where}"
    )


class RunLog:
    """The ``callback`` of `memorize()`: appends each chunk's record to ``folder / CHUNK_LOG`` (on rank 0) and prints
    the estimated time left after the first chunk this process timed on its own (the one before it includes the
    memory's initialisation).

    Args:
        folder: the checkpoint folder, or ``None`` for no log.
        num_chunks: the run's chunk count.
        is_main: whether this process writes and prints (rank 0).
        quiet: write the log but print nothing (one of several texts memorised side by side: the longest prints).
    """

    def __init__(self, folder: Path | None, num_chunks: int, is_main: bool, quiet: bool = False) -> None:
        self.path = folder / CHUNK_LOG if folder is not None and is_main else None
        self.num_chunks, self.announces = num_chunks, is_main and not quiet
        self._times: list[float] = []

    def __call__(self, index: int, result: Any) -> None:
        self._times.append(time.perf_counter())
        if len(self._times) == 1 and index > 0 and self.announces:  # chunks before this one came from a checkpoint
            from tqdm.auto import tqdm

            tqdm.write(f"memorize: resumed from a checkpoint after chunk {index} of {self.num_chunks}", file=sys.stderr)
        if self.path is not None:
            if len(self._times) == 1:  # resumed: chunks after the last checkpoint were logged, then redone
                self._keep_before(index)
            record = {
                "chunk": index,
                "tokens": result.token_counts[-1],
                "loss": result.losses[-1],
                "perplexity": math.exp(result.losses[-1]),
                "baseline_loss": result.baseline_losses[-1] if result.baseline_losses else None,
                "train_loss": result.train_losses[-1] if result.train_losses else None,
                "elapsed_s": round(result.wall_time_s, 3),
            }
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
        left = self.num_chunks - index - 1
        if len(self._times) == 2 and left > 0 and self.announces:
            took = self._times[1] - self._times[0]
            from tqdm.auto import tqdm  # prints above the progress bar instead of through it

            tqdm.write(f"memorize: about {_duration(took * left)} left ({took:.1f} s per chunk)", file=sys.stderr)

    def _keep_before(self, index: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _chunk(line) < index]
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _chunk(line: str) -> int:
    try:
        return int(json.loads(line)["chunk"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize  # a line cut by a crash: dropped


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
