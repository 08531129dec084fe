"""What every benchmark script shares: the model and text it runs on, timing, and writing results.

Benchmarks compose the library; they never reimplement it. Each one measures its variants side by side in one process
(interleaved repetitions, medians) and reports ratios, because this machine's absolute speed is noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: where `load_model` puts models (``--device``, ``--dtype``; set by `apply_common`)
_PLACEMENT: dict[str, Any] = {"device": torch.device("cpu"), "dtype": torch.float32}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the prepared SmolLM2-135M, see `python -m peft_locas.assets`), 'tiny' (a random tiny Llama "
        "built from a config, for smoke tests) or a local model folder",
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores instead of the full run")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's weights and compute")


def apply_common(args: argparse.Namespace) -> None:
    """Apply the common options: pin torch's CPU thread count when ``--threads`` is given (e.g. to share the machine
    with another run), and make ``--device``/``--dtype`` where `load_model` puts models."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA device")
    _PLACEMENT.update(device=torch.device(args.device), dtype=DTYPES[args.dtype])


def learning_rates(parser: argparse.ArgumentParser, option: str, text: str) -> list[float]:
    """The comma-separated learning rates of ``option`` (``text``, e.g. ``"1e-3,5e-4"``), in order, repeats dropped; the
    option itself stays a string in the results' record, so its command line reads as typed.

    Raises:
        SystemExit: (through ``parser.error``) an entry is not a positive number.
    """
    try:
        rates = [float(value) for value in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(rate > 0 for rate in rates):
        parser.error(f"{option} {text!r}: give comma-separated positive learning rates, e.g. 1e-3,5e-4")
    return list(dict.fromkeys(rates))


def placement_arguments(args: argparse.Namespace) -> list[str]:
    """The common options a child process must repeat to run as its parent does."""
    threads = ["--threads", str(args.threads)] if args.threads is not None else []
    return [*threads, "--device", args.device, "--dtype", args.dtype]


def load_model(name: str, dtype: torch.dtype | None = None, **kwargs: Any):
    """``(model, tokenizer)`` for ``--model``, in ``--dtype`` on ``--device`` (`apply_common`) unless ``dtype`` or a
    ``device_map`` is given; the tiny random model has no tokenizer (``None``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or _PLACEMENT["dtype"]
    if name == "tiny":
        folder, tokenizer = tiny_model_folder(), None
    else:
        from peft_locas.assets import default_model_dir

        folder = default_model_dir() if name == "default" else Path(name)
        if folder is None:
            raise SystemExit("error: the real model is not prepared; run `python -m peft_locas.assets` first")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    if "device_map" not in kwargs:
        model.to(_PLACEMENT["device"])
    return model, tokenizer


def device() -> torch.device:
    """``--device``: where `load_model` puts models, so inputs built here go there too."""
    return _PLACEMENT["device"]


def synchronize() -> None:
    """Wait for queued GPU work, so a timer read after it measures the work (a no-op on a CPU)."""
    if _PLACEMENT["device"].type == "cuda":
        torch.cuda.synchronize(_PLACEMENT["device"])


def book_token_ids(tokenizer: Any, book: str, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of a prepared book; without a tokenizer (tiny model), seeded random ids that
    differ per book, so smoke tests exercise the same code paths."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(zlib.crc32(book.encode()))
        return torch.randint(1, 256, (tokens,), generator=generator).tolist()
    from peft_locas.assets import book_path

    path = book_path(book)
    if path is None:
        raise SystemExit(f"error: the book {book!r} is not prepared; run `python -m peft_locas.assets` first")
    ids = tokenizer(path.read_text(encoding="utf-8")[: 8 * tokens], verbose=False)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"error: {book} has only {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids


def text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text to token ids without special tokens; the tiny model (vocabulary 256, no tokenizer) reads UTF-8 bytes."""
    if tokenizer is None:
        return lambda text: list(text.encode("utf-8"))
    return lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


@functools.cache
def tiny_model_folder() -> Path:
    """A seeded random tiny Llama saved once per process (quantized loading needs a checkpoint on disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = Path(tempfile.mkdtemp(prefix="peft_locas_tiny_"))
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def timed_rounds(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each call of each function, measured in ``repeats`` interleaved rounds (every function
    once per round, in order) so drift on a shared machine hits every variant alike; ``warmup`` untimed rounds first.
    CPU time is this process's (all threads), so on a busy machine it shows what the wall time hides."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            function()
            synchronize()
            samples[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return samples


def median_seconds(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function over `timed_rounds`."""
    rounds = timed_rounds(functions, repeats, warmup)
    return {name: statistics.median(wall for wall, _ in times) for name, times in rounds.items()}


def round_ratios(rounds: dict[str, list[tuple[float, float]]], name: str, reference: str) -> dict[str, Any]:
    """``name``'s time over ``reference``'s, round by round (the same round's neighbours share the machine's state):
    the median and range of the wall-time ratios and the median CPU-time ratio."""
    wall = [a[0] / b[0] for a, b in zip(rounds[name], rounds[reference], strict=True)]
    cpu = [a[1] / b[1] for a, b in zip(rounds[name], rounds[reference], strict=True)]
    return {"wall": statistics.median(wall), "wall range": (min(wall), max(wall)), "cpu": statistics.median(cpu)}


def measure_in_child(script: str, arguments: list[str], what: str) -> dict[str, Any]:
    """Run ``python script *arguments`` (one measurement in a process of its own: its own peak memory, nothing warm
    from another run) and return the JSON object its last line of output holds.

    Raises:
        SystemExit: the child failed; the message names ``what`` and ends with the child's error output.
    """
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(_PLACEMENT["device"]),
        "dtype": str(_PLACEMENT["dtype"]).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def default_work(name: str, quick: bool) -> str:
    """Where a benchmark keeps its finished runs unless ``--work`` says otherwise:
    ``~/.cache/peft-locas/benchmarks/<name>`` (``<name>_quick`` with ``--quick``)."""
    return str(Path.home() / ".cache/peft-locas/benchmarks" / f"{name}{'_quick' * quick}")


def set_work(args: argparse.Namespace, name: str) -> None:
    """``args.work``, or the benchmark's `default_work` when not given, created."""
    args.work = args.work or default_work(name, args.quick)
    Path(args.work).mkdir(parents=True, exist_ok=True)


def figure_path(name: str, args: argparse.Namespace) -> Path:
    """Where a benchmark's plot goes: beside ``--out`` when given, else in ``benchmarks/results/``, named as its JSON
    (``<name>.png``, ``<name>_quick.png`` with ``--quick``); the folder is created."""
    path = (args.out.parent if args.out else RESULTS) / f"{name}{'_quick' if args.quick else ''}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, args: argparse.Namespace, results: dict[str, Any]) -> Path:
    """Write ``results`` with the command's arguments and the machine, and return the path."""
    out = args.out or RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "arguments": {k: str(v) for k, v in vars(args).items() if k not in ("started", "cpu_started")},  # clocks
        "machine": machine(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **results,
    }
    out.write_text(json.dumps(payload, indent=2))
    return out


def finish(
    name: str, args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str], results: dict[str, Any]
) -> int:
    """Print ``rows`` as a table, write them with ``results`` (and the wall and CPU time since ``args.started``,
    ``args.cpu_started``) as the benchmark's JSON, and say where; returns the exit status 0."""
    print_table(rows, columns)
    seconds, cpu_seconds = time.perf_counter() - args.started, time.process_time() - args.cpu_started
    path = write_results(name, args, {"rows": rows, **results, "seconds": seconds, "cpu_seconds": cpu_seconds})
    print(f"results: {path} ({seconds:.0f} s, CPU {cpu_seconds:.0f} s in this process)")
    return 0


def start_clock(args: argparse.Namespace) -> None:
    """Record the wall and CPU clocks `finish` measures from."""
    args.started, args.cpu_started = time.perf_counter(), time.process_time()


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table on stdout."""
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
