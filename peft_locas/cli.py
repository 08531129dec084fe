"""The ``peft-locas`` command line (also ``python -m peft_locas``).

``memorize`` writes a text into a Locas memory (or a TempLoRA LoRA baseline) and saves the adapter with its results
and a loss plot; ``merge`` bakes an adapter into a vanilla checkpoint; ``eval`` measures a text's chunked perplexity;
``assets`` prepares the offline default model and books. Models and tokenizers load from local folders only. Every bad
input ends in one ``error: ...`` line on stderr and a non-zero exit status, never a traceback. Under ``torchrun`` or
``accelerate launch`` every process runs the engine and rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import assets
from .checkpointing import CheckpointError
from .config import LocasConfig
from .data_init import METHODS
from .distributed import Ranks
from .memorization import MemorizeConfig, evaluate, memorize, templora_config
from .plotting import plot_losses
from .results import MemorizeResult

RESULTS_FILE = "memorize_results.json"
PLOT_FILE = "memorize_losses.png"
_DTYPES = ("float32", "bfloat16", "float16", "auto")


class UsageError(Exception):
    """A bad input; the message is the one line shown after ``error:``."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (no usage block) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["assets"]:  # its own parser (python -m peft_locas.assets), arguments passed on as they are
        return assets.main(argv[1:])
    args = build_parser().parse_args(argv)
    # transformers deprecation noise that PEFT triggers on every get_peft_model; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return args.run(args)
    except (UsageError, CheckpointError, assets.AssetError, ValueError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = (
            "; rerun the same command to resume from the last checkpoint"
            if getattr(args, "checkpoint_dir", None)
            else ""
        )
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        _end_distributed()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peft-locas", description="Memorise long texts into Locas parametric memories (arXiv 2602.05085)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    memorize = commands.add_parser("memorize", help="memorise a text into a Locas memory (score, then train)")
    _model_options(memorize)
    memorize.add_argument("--text", required=True, help="a UTF-8 text file, or a prepared book (e.g. emma)")
    memorize.add_argument("--out", required=True, type=Path, help="adapter folder to write (with results and plot)")
    memorize.add_argument("--adapter-type", choices=("locas", "lora"), default="locas", help="lora: TempLoRA baseline")
    memorize.add_argument(
        "--r",
        "--width",
        dest="r",
        type=_positive_int,
        default=64,
        help="memory width (LoRA rank for lora); spell it --width under torchrun or accelerate launch, whose own "
        "parsers take --r for an abbreviation of their options",
    )
    memorize.add_argument("--chunk-tokens", type=_int_at_least(2), default=512)
    memorize.add_argument("--context-tokens", type=_int_at_least(0), default=256)
    memorize.add_argument("--steps-per-chunk", type=_int_at_least(0), default=2)
    memorize.add_argument("--lr", type=_positive_float, default=None, help="default: 4e-3 (Locas), 5e-5 (LoRA)")
    memorize.add_argument("--init", choices=tuple(METHODS), default="top_k", help="Locas initialisation method")
    memorize.add_argument("--max-tokens", type=_token_limit, default=None, help="memorise the first N tokens, or all")
    memorize.add_argument("--seed", type=_int_at_least(0), default=0)
    memorize.add_argument("--checkpoint-dir", type=Path, default=None, help="save here, and resume from here")
    memorize.add_argument("--checkpoint-every", type=_positive_int, default=1, help="chunks between checkpoints")
    memorize.add_argument("--compare-baseline", action="store_true", help="also score each chunk without memory")
    memorize.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    memorize.set_defaults(run=_memorize)

    merge = commands.add_parser("merge", help="merge an adapter into the model: a vanilla transformers checkpoint")
    _model_options(merge)
    merge.add_argument("--adapter", required=True, type=Path, help="adapter folder (from memorize)")
    merge.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    merge.add_argument("--dequantize", action="store_true", help="merge a quantized base exactly, in full precision")
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    merge.set_defaults(run=_merge)

    evaluate = commands.add_parser("eval", help="chunked perplexity of a text, with and without an adapter")
    _model_options(evaluate)
    evaluate.add_argument("--adapter", type=Path, default=None, help="adapter folder; compared with the bare model")
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file, or a prepared book (e.g. emma)")
    evaluate.add_argument("--chunk-tokens", type=_int_at_least(2), default=512)
    evaluate.add_argument("--context-tokens", type=_int_at_least(0), default=256)
    evaluate.add_argument("--max-tokens", type=_token_limit, default=None, help="score the first N tokens, or all")
    evaluate.set_defaults(run=_evaluate)

    commands.add_parser("assets", help="prepare the offline default model and books (see `peft-locas assets --help`)")
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="local model folder (default: the prepared SmolLM2)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda if available (one per rank), else cpu")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 base")
    quantization.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8 base")


# ---------------------------------------------------------------------------------------------- commands
def _memorize(args: argparse.Namespace) -> int:
    _check_out(args.out, args.overwrite)
    text, label = _read_text(args.text)
    config = MemorizeConfig(
        chunk_tokens=args.chunk_tokens,
        context_tokens=args.context_tokens,
        steps_per_chunk=args.steps_per_chunk,
        lr=args.lr,
        init=args.init,
        max_tokens=args.max_tokens,
        compare_baseline=args.compare_baseline,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        show_progress=True,
    )
    model_dir = _model_dir(args.model)
    model, tokenizer, ranks = _load(model_dir, args)
    peft_config = LocasConfig(r=args.r) if args.adapter_type == "locas" else templora_config(args.r)
    result = memorize(model, tokenizer, text, config, peft_config=peft_config)
    if not ranks.is_main:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(args.out)
    record = {
        "model": str(model_dir),
        "text": label,
        "adapter_type": args.adapter_type,
        "r": args.r,
        "settings": config.protocol(args.adapter_type),
        "world_size": ranks.size,
        "result": result.to_dict(),
    }
    (args.out / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot_losses(result, args.out / PLOT_FILE, title=f"{label}: loss of each chunk before training on it")
    print(summary_table(result))
    print(f"adapter, results and plot: {args.out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    _check_out(args.out, args.overwrite)
    model_dir = _model_dir(args.model)
    adapter_config = _adapter_config(args.adapter)
    if args.dequantize and not isinstance(adapter_config, LocasConfig):
        raise UsageError("--dequantize applies to Locas adapters; this adapter is a " + type(adapter_config).__name__)
    model, tokenizer, ranks = _load(model_dir, args)
    _check_adapter_fits(model, args.adapter)
    width = getattr(model.config.get_text_config(), "intermediate_size", None)
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    kwargs = {"dequantize": True} if args.dequantize else {}
    merged = peft_model.merge_and_unload(**kwargs)
    if not ranks.is_main:
        return 0
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    new_width = getattr(merged.config.get_text_config(), "intermediate_size", None)
    grown = f" (MLP intermediate size {width} -> {new_width})" if width != new_width else ""
    print(f"merged checkpoint{grown}: {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    text, _ = _read_text(args.text)
    model_dir = _model_dir(args.model)
    if args.adapter is not None:
        _adapter_config(args.adapter)
    model, tokenizer, ranks = _load(model_dir, args)
    if args.adapter is not None:
        _check_adapter_fits(model, args.adapter)
        model = PeftModel.from_pretrained(model, args.adapter)
    result = evaluate(
        model,
        tokenizer,
        text,
        chunk_tokens=args.chunk_tokens,
        context_tokens=args.context_tokens,
        max_tokens=args.max_tokens,
        compare_baseline=args.adapter is not None,
        show_progress=ranks.is_main,
    )
    if ranks.is_main:
        print(summary_table(result, with_label="with adapter" if args.adapter else "model"))
    return 0


def summary_table(result: MemorizeResult, with_label: str = "with memory") -> str:
    """The run's perplexities (with and, when recorded, without the adapter) and costs, as an aligned text table."""
    rows = [("", with_label, "without memory" if result.baseline_losses is not None else "")]
    rows.append(("prequential perplexity", f"{result.perplexity:.3f}", _fmt(result.baseline_perplexity)))
    rows.append(
        ("mean chunk perplexity", f"{result.mean_chunk_perplexity:.3f}", _fmt(result.baseline_mean_chunk_perplexity))
    )
    peak = result.peak_memory_bytes
    memory = "n/a" if peak is None else f"{peak / 2**30:.2f} GiB ({result.peak_memory_kind})"
    rows += [
        ("tokens scored", f"{result.total_tokens} in {len(result.token_counts)} chunks", ""),
        ("wall time", f"{result.wall_time_s:.1f} s", ""),
        ("tokens/s", f"{result.tokens_per_s:.1f}", ""),
        ("peak memory", memory, ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows)


# ---------------------------------------------------------------------------------------------- inputs
def _read_text(spec: str) -> tuple[str, str]:
    """The text of a file, or of a prepared book named by its slug; returns ``(text, label)``."""
    path = Path(spec).expanduser()
    if not path.exists() and spec in assets.ALL_BOOKS:
        book = assets.book_path(spec)
        if book is None:
            raise UsageError(f"book {spec!r} is not prepared: run `peft-locas assets` first")
        path = book
    if not path.is_file():
        raise UsageError(f"text file {spec} not found (give a file, or a book: {', '.join(assets.ALL_BOOKS)})")
    data = path.read_bytes()
    if not data.strip():
        raise UsageError(f"text file {path} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a UTF-8 text file (undecodable byte at offset {exc.start})") from exc
    if "\x00" in text:
        raise UsageError(f"{path} is not a text file (it contains NUL bytes)")
    return text, path.stem


def _model_dir(path: Path | None) -> Path:
    if path is None:
        folder = assets.default_model_dir()
        if folder is None:
            raise UsageError("the default model is not prepared: run `peft-locas assets`, or pass --model FOLDER")
        return folder
    if not (path / "config.json").is_file():
        raise UsageError(
            f"model folder {path} not found (no config.json there): --model takes a local folder, models are never "
            "downloaded; `peft-locas assets` prepares the default one"
        )
    return path


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty: pass --overwrite to write into it, or choose another")


def _adapter_config(adapter: Path) -> Any:
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UsageError(
            f"adapter folder {adapter} not found (needs adapter_config.json and adapter_model.safetensors)"
        )
    try:
        return PeftConfig.from_pretrained(adapter)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{adapter}/adapter_config.json is not a readable PEFT adapter config ({exc})") from exc


def _check_adapter_fits(model: Any, adapter: Path) -> None:
    """Refuse an adapter made for another base model (another layer count or hidden size) before loading it, with the
    reason in one line, instead of PEFT's multi-line size-mismatch error."""
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as tensors:
        shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    text_config = model.config.get_text_config()
    layers, hidden = getattr(text_config, "num_hidden_layers", None), getattr(text_config, "hidden_size", None)
    modules = dict(model.named_modules())
    for key, shape in sorted(shapes.items()):
        match = re.match(r"base_model\.model\.(.+?)\.(locas_memory|lora_[AB]|lora_embedding_[AB])\.(\w+)", key)
        if match is None:
            continue
        name, kind, part = match.groups()
        index = re.search(r"\.(\d+)\.", f".{name}.")
        if name not in modules:
            if index is not None and layers is not None and int(index.group(1)) >= layers:
                raise UsageError(
                    f"adapter {adapter} was made for another base model: it has layer {index.group(1)}, this model has "
                    f"{layers} layers"
                )
            raise UsageError(f"adapter {adapter} was made for another base model: this model has no module {name}")
        expected = _expected_width(modules[name], kind, part, hidden)
        if expected is None:
            continue
        actual = shape[-1] if kind == "locas_memory" or kind.endswith("A") else shape[0]
        if actual != expected:
            raise UsageError(
                f"adapter {adapter} was made for another base model: its {name} has {actual} features, this model's "
                f"{expected} (hidden size {hidden}, {layers} layers)"
            )


def _expected_width(module: Any, kind: str, part: str, hidden: int | None) -> int | None:
    """The dimension of the base model an adapter tensor must match: the hidden size for a Locas memory's rows, the
    input (A) or output (B) features for LoRA."""
    if kind == "locas_memory":
        return hidden if part in ("gate", "key", "value") else None
    return getattr(module, "in_features" if kind.endswith("A") else "out_features", None)


# ---------------------------------------------------------------------------------------------- model loading
def _load(model_dir: Path, args: argparse.Namespace) -> tuple[Any, Any, Ranks]:
    """Model (eval mode, on this rank's device) and tokenizer from a local folder; starts the process group when the
    command runs under torchrun / accelerate launch."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device}: {_one_line(exc)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here")
    ranks = _start_distributed(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": args.dtype}
    if args.load_in_4bit or args.load_in_8bit:
        compute = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
        quantization = (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
            if args.load_in_4bit
            else {"load_in_8bit": True}
        )
        kwargs.update(quantization_config=BitsAndBytesConfig(**quantization), device_map={"": device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UsageError(f"cannot load a causal language model from {model_dir}: {_one_line(exc)}") from exc
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval(), tokenizer, ranks


def _start_distributed(device: torch.device) -> Ranks:
    """Join the process group that torchrun / accelerate launch describe in the environment (gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks.current()


def _end_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- argument types
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _int_at_least(1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _token_limit(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
