"""``peft-locas merge``: bake an adapter into a vanilla transformers checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .inputs import RESULTS_FILE, adapter_config, check_out, memorize_record, model_dir
from .options import UsageError, model_options, positive_int
from .output import atomic_folder, check_writable

#: the block width of GGUF's 32-wide formats (Q4_0 ... Q8_0): llama.cpp stores a tensor whose rows are not whole
#: blocks in F16, and the rows of ffn_down are as long as the MLP width
GGUF_BLOCK = 32


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into the model: a vanilla transformers checkpoint")
    # "auto": the merged checkpoint keeps the base's dtype (a bf16 base stays bf16, half the size of float32)
    model_options(parser, default_help="the base the adapter recorded, else the prepared SmolLM2", dtype="auto")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter folder (from memorize)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--dequantize", action="store_true", help="merge a quantized base exactly, in full precision")
    parser.add_argument(
        "--pad-to-multiple-of",
        type=positive_int,
        default=None,
        metavar="N",
        help="append zero units (same outputs) until the MLP width is a multiple of N; 256 suits every GGUF format "
        "(llama.cpp's Q4_K_M included) (default: the merged width as it is)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, args.overwrite, (args.adapter, args.model))
    check_writable(args.out)
    config = adapter_config(args.adapter)
    folder = model_dir(args.model, args.adapter)

    from ..tuner.config import LocasConfig
    from .loading import load, load_adapter

    if args.dequantize and not isinstance(config, LocasConfig):
        raise UsageError("--dequantize applies to Locas adapters; this adapter is a " + type(config).__name__)
    if args.pad_to_multiple_of is not None and not isinstance(config, LocasConfig):
        raise UsageError("--pad-to-multiple-of applies to Locas adapters; this adapter is a " + type(config).__name__)
    quantized = args.load_in_4bit or args.load_in_8bit or _quantized(folder)
    if (args.pad_to_multiple_of or 1) > 1 and quantized and not args.dequantize:
        raise UsageError(
            "--pad-to-multiple-of pads a full-precision merge and this base is quantized: add --dequantize (the "
            "export for llama.cpp and vLLM), or leave --pad-to-multiple-of out"
        )
    if args.dequantize and not quantized:
        print(
            "warning: --dequantize has no effect: the base is not quantized (it applies with --load-in-4bit, "
            "--load-in-8bit or a quantized checkpoint)",
            file=sys.stderr,
        )
    model, tokenizer, ranks = load(folder, args)
    width = _mlp_width(model)
    peft_model = load_adapter(model, args.adapter)
    kwargs = {"dequantize": True} if args.dequantize else {}
    if args.pad_to_multiple_of is not None:
        kwargs["pad_to_multiple_of"] = args.pad_to_multiple_of
    merged = peft_model.merge_and_unload(**kwargs)
    if not ranks.is_main:
        return 0
    with atomic_folder(args.out, _weights_bytes(merged)) as partial:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if (record := memorize_record(args.adapter)) is not None:  # what the checkpoint memorised: ask words for it
            record = {**record, "merged_from": str(args.adapter.resolve())}
            (partial / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    new_width = _mlp_width(merged)
    padded = f", padded to a multiple of {args.pad_to_multiple_of}" if (args.pad_to_multiple_of or 1) > 1 else ""
    grown = f" (MLP intermediate size {width} -> {new_width}{padded})" if width != new_width else ""
    print(f"merged checkpoint{grown}: {args.out}")
    if isinstance(config, LocasConfig) and args.pad_to_multiple_of is None and (new_width or 0) % GGUF_BLOCK:
        # padding a quantized base needs --dequantize (see above)
        flags = (
            "--dequantize --pad-to-multiple-of 256" if quantized and not args.dequantize else "--pad-to-multiple-of 256"
        )
        print(
            f"note: the MLP width {new_width} is not a multiple of {GGUF_BLOCK}, so llama.cpp would store every "
            f"ffn_down of a GGUF export in F16; for GGUF, merge with {flags} (zero units, same outputs)",
            file=sys.stderr,
        )
    return 0


def _mlp_width(model) -> int | None:
    """The intermediate size of the model's MLP blocks (the widest, should they differ), ``None`` without any."""
    from ..tuner.model import iter_mlp_blocks

    widths = [kind.width(module) for _, module, kind in iter_mlp_blocks(model)]
    return max(widths, default=None)


def _weights_bytes(model) -> int:
    """The bytes ``save_pretrained`` writes for the weights (tied tensors once), plus 16 MB for tokenizer files."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(tensors.values()) + 16 * 10**6


def _quantized(folder: Path) -> bool:
    """Whether the checkpoint's config.json names a quantization (e.g. a saved bitsandbytes model)."""
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
