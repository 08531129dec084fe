"""``peft-locas merge``: bake an adapter into a vanilla transformers checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .inputs import adapter_config, check_out, model_dir
from .options import UsageError, model_options
from .output import atomic_folder, check_writable


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into the model: a vanilla transformers checkpoint")
    # "auto": the merged checkpoint keeps the base's dtype (a bf16 base stays bf16, half the size of float32)
    model_options(parser, default_help="the base the adapter recorded, else the prepared SmolLM2", dtype="auto")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter folder (from memorize)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--dequantize", action="store_true", help="merge a quantized base exactly, in full precision")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, args.overwrite)
    check_writable(args.out)
    config = adapter_config(args.adapter)
    folder = model_dir(args.model, args.adapter)

    from ..config import LocasConfig
    from .loading import load, load_adapter

    if args.dequantize and not isinstance(config, LocasConfig):
        raise UsageError("--dequantize applies to Locas adapters; this adapter is a " + type(config).__name__)
    if args.dequantize and not (args.load_in_4bit or args.load_in_8bit) and not _quantized(folder):
        print(
            "warning: --dequantize has no effect: the base is not quantized (it applies with --load-in-4bit, "
            "--load-in-8bit or a quantized checkpoint)",
            file=sys.stderr,
        )
    model, tokenizer, ranks = load(folder, args)
    width = getattr(model.config.get_text_config(), "intermediate_size", None)
    peft_model = load_adapter(model, args.adapter)
    kwargs = {"dequantize": True} if args.dequantize else {}
    merged = peft_model.merge_and_unload(**kwargs)
    if not ranks.is_main:
        return 0
    with atomic_folder(args.out, _weights_bytes(merged)) as partial:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    new_width = getattr(merged.config.get_text_config(), "intermediate_size", None)
    grown = f" (MLP intermediate size {width} -> {new_width})" if width != new_width else ""
    print(f"merged checkpoint{grown}: {args.out}")
    return 0


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
