"""``peft-locas compose``: several memories (e.g. one per book) into one adapter whose output is exactly their
weighted sum (`peft_locas.tuner.composition`), to use or merge as any memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .inputs import RESULTS_FILE, adapter_config, base_fingerprint, check_out, memories_in, shared_base
from .options import UsageError, model_options
from .output import atomic_folder, check_writable


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compose", help="compose memories into one: the exact (weighted) sum of their outputs")
    model_options(parser, default_help="the base the first adapter recorded, else the prepared SmolLM2")
    parser.add_argument(
        "--adapter", required=True, action="append", type=Path, help="a memory to compose (give two or more)"
    )
    parser.add_argument(
        "--weight",
        action="append",
        type=float,
        default=None,
        help="one per --adapter, in order: the factor of that memory's output (default: 1 each)",
    )
    parser.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, args.overwrite, (*args.adapter, args.model))
    check_writable(args.out)
    for adapter in args.adapter:  # a library first: "give --adapter for each" would not say what it is
        if memories_in(adapter):
            adapter_config(adapter)
    if len(args.adapter) < 2:
        raise UsageError("compose takes two or more memories: give --adapter for each")
    resolved = [adapter.resolve() for adapter in args.adapter]
    if twice := next((a for i, a in enumerate(args.adapter) if resolved[i] in resolved[:i]), None):
        raise UsageError(f"--adapter {twice} is given twice: give each memory once (--weight scales a memory)")
    weights = args.weight if args.weight is not None else [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise UsageError(f"give one --weight per --adapter ({len(args.adapter)} adapters, {len(weights)} weights)")
    for adapter in args.adapter:
        kind = type(adapter_config(adapter)).__name__
        if kind != "LocasConfig":
            raise UsageError(f"--adapter {adapter} is a {kind}; compose takes Locas memories")
    folder = shared_base(args.model, args.adapter)

    from .loading import load, load_adapters

    model, _, ranks = load(folder, args)
    names = [f"input_{index}" for index in range(len(args.adapter))]
    peft_model = load_adapters(model, args.adapter, names)
    peft_model.add_weighted_adapter(names, weights, "default")
    peft_model.set_adapter("default")
    for name in names:
        peft_model.delete_adapter(name)
    if not ranks.is_main:
        return 0
    record = {
        "model": str(folder),
        "base_fingerprint": base_fingerprint(folder),
        "composed_from": [str(adapter.resolve()) for adapter in args.adapter],
        "weights": weights,
        "adapter_type": "locas",
        "r": peft_model.peft_config["default"].r,
    }
    with atomic_folder(args.out) as partial:
        peft_model.save_pretrained(partial)
        (partial / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"composed memory (r={record['r']}) of {len(args.adapter)} memories: {args.out}")
    return 0
