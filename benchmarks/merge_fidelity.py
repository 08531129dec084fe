"""Merge fidelity: logits of the merged model against the unmerged adapter model on real text.

For fp32 and bf16 bases, ``merge_and_unload()``; for bitsandbytes 8-bit and 4-bit (NF4) bases, both merge paths: the
re-quantized merge (``merge_adapter()``, in place, as ``merge_and_unload()`` does) and the float export
(``merge_and_unload(dequantize=True)``). Reports max and mean absolute logit differences, the memory's own effect on
the logits (unmerged against base) and the share of it that survives the merge, plus the noise floor of the quantized
kernels (the quantized base against its own dequantized copy).

    python benchmarks/merge_fidelity.py [--quick] [--model default|tiny|DIR] [--tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from common import add_common_arguments, load_model_and_text, print_table, write_results
from peft import get_peft_model
from transformers import BitsAndBytesConfig

from peft_locas import LocasConfig
from peft_locas.export import dequantize_base_model

QUANTIZED = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def compare(name: str, merged: torch.Tensor, unmerged: torch.Tensor, base: torch.Tensor, **extra: float) -> dict:
    difference = (merged - unmerged).abs()
    return {
        "setting": name,
        "max abs diff": difference.max().item(),
        "mean abs diff": difference.mean().item(),
        "memory effect (mean abs)": (unmerged - base).abs().mean().item(),
        "effect kept": 1 - ((merged - unmerged).norm() / (unmerged - base).norm()).item(),
        **extra,
    }


def adapter(model: torch.nn.Module, r: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random non-identity memory for every setting
    return get_peft_model(model, LocasConfig(r=r, init_weights=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="sequence length (default 512, quick 128)")
    parser.add_argument("--r", type=int, default=64)
    args = parser.parse_args(argv)
    tokens = args.tokens or (128 if args.quick else 512)

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _, ids = load_model_and_text(args.model, dtype=dtype)
        x = ids[:, :tokens]
        base = logits(model, x)
        peft_model = adapter(model, args.r)
        unmerged = logits(peft_model, x)
        rows.append(compare(f"{name} merge_and_unload", logits(peft_model.merge_and_unload(), x), unmerged, base))

    for name, quantization in QUANTIZED.items():
        model, _, ids = load_model_and_text(args.model, quantization_config=quantization, device_map="cpu")
        x = ids[:, :tokens]
        logits(model, x[:, :8])  # bitsandbytes may repack 4-bit weights for its CPU kernel on the first call
        base = logits(model, x)
        peft_model = adapter(model, args.r)
        unmerged = logits(peft_model, x)
        peft_model.merge_adapter()
        rows.append(compare(f"{name} re-quantized merge", logits(peft_model, x), unmerged, base))
        peft_model.unmerge_adapter()
        exported = logits(peft_model.merge_and_unload(dequantize=True), x)
        reference, _, _ = load_model_and_text(args.model, quantization_config=quantization, device_map="cpu")
        dequantize_base_model(reference)
        noise = (logits(reference, x) - base).abs().max().item()
        rows.append(compare(f"{name} float export", exported, unmerged, base, **{"kernel noise (max abs)": noise}))

    columns = ["setting", "max abs diff", "mean abs diff", "memory effect (mean abs)", "effect kept"]
    print(f"\nMerged vs unmerged logits, r={args.r}, {tokens} tokens:")
    print_table(rows, columns + ["kernel noise (max abs)"])
    path = write_results("merge_fidelity", args, {"tokens": tokens, "r": args.r, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
