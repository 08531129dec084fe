"""Merge fidelity: logits of the merged model against the unmerged adapter model on real text.

The memory first learns a few chunks of the book (`peft_locas.memorize()` on the fp32 base), so its effect on the
logits is that of a real memory, not of random weights. The same trained memory is then loaded over each base: fp32
and bf16 (``merge_and_unload()``), and bitsandbytes 8-bit and 4-bit NF4 with both merge paths, the re-quantized merge
(``merge_adapter()``, in place, as ``merge_and_unload()`` does) and the float export
(``merge_and_unload(dequantize=True)``). Reported per setting: max and mean absolute logit difference, merged vs
unmerged; the memory's own effect on the logits (unmerged vs base) and the share of it the merge keeps; for the
in-place merges the same share measured per MLP block in fp32 from the dequantized weights, which no kernel rounding
blurs; and the quantized kernels' own noise floor (the quantized base against its dequantized copy).

    python benchmarks/merge_fidelity.py [--quick] [--model default|tiny|DIR] [--tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from common import add_common_arguments, apply_common, book_token_ids, load_model, print_table, write_results
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BitsAndBytesConfig

from peft_locas import LocasConfig, LocasLayer, MemorizeConfig, memorize
from peft_locas.weights.blocks import units_output
from peft_locas.weights.export import dequantize_base_model

QUANTIZED = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(model.device)).logits.float()


def trained_memory(args: argparse.Namespace, tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The book's first ``tokens`` token ids (the text compared), and a Locas memory (r = ``--r``) trained on the
    text after them, so the compared text is new to it."""
    model, tokenizer = load_model(args.model)
    chunk = 128 if args.quick else 512
    ids = book_token_ids(tokenizer, "pride_and_prejudice", tokens + args.chunks * chunk)
    config = MemorizeConfig(chunk_tokens=chunk, context_tokens=chunk // 2, seed=args.seed)
    result = memorize(model, None, ids[tokens:], config, peft_config=LocasConfig(r=args.r, init_weights="data"))
    print(f"memory trained on {result.total_tokens} tokens: prequential perplexity {result.perplexity:.2f}")
    return torch.tensor([ids[:tokens]]), get_peft_model_state_dict(result.model)


def with_memory(model: torch.nn.Module, state: dict[str, torch.Tensor], r: int):
    peft_model = get_peft_model(model, LocasConfig(r=r, init_weights=False))
    set_peft_model_state_dict(peft_model, state)
    return peft_model.eval()


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


def merged_in_place(peft_model, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits after ``merge_adapter()``, and the share of the memory's effect that the merged blocks keep, measured
    block by block in fp32 on the blocks' own inputs (the model is unmerged again afterwards)."""
    layers = [module for module in peft_model.modules() if isinstance(module, LocasLayer)]
    inputs = {}

    def keep_input(module: torch.nn.Module, args: tuple) -> None:
        inputs.setdefault(module, args[0].detach().float())

    hooks = [layer.register_forward_pre_hook(keep_input) for layer in layers]
    logits(peft_model, x)
    for hook in hooks:
        hook.remove()

    def block_output(layer: LocasLayer) -> torch.Tensor:
        block = layer.get_base_layer()
        return units_output(layer.block_kind.read_units(block), inputs[layer], layer.block_kind.activation(block))

    with torch.no_grad():
        effect = {
            layer: layer.memory_output(inputs[layer].to(layer.locas_memory["default"].key.dtype), "default").float()
            for layer in layers
        }
        expected = {layer: block_output(layer) + effect[layer] for layer in layers}
        peft_model.merge_adapter()
        error = sum((block_output(layer) - expected[layer]).norm() ** 2 for layer in layers)
        kept = 1 - (error / sum(e.norm() ** 2 for e in effect.values())).sqrt().item()
    merged = logits(peft_model, x)
    peft_model.unmerge_adapter()
    return merged, kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="sequence compared (default 512, quick 128)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks the memory learns first (512 tokens; quick 128)")
    parser.add_argument("--r", type=int, default=64)
    args = parser.parse_args(argv)
    apply_common(args)
    tokens = args.tokens or (128 if args.quick else 512)
    x, state = trained_memory(args, tokens)

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peft_model = with_memory(load_model(args.model, dtype=dtype)[0], state, args.r)
        unmerged = logits(peft_model, x)
        with peft_model.disable_adapter():
            base = logits(peft_model, x)
        merged, kept = merged_in_place(peft_model, x)
        rows.append(compare(f"{name} merge", merged, unmerged, base, **{"effect kept per block": kept}))

    for name, quantization in QUANTIZED.items():
        model = load_model(args.model, quantization_config=quantization, device_map="cpu")[0]
        logits(model, x[:, :8])  # bitsandbytes may repack 4-bit weights for its CPU kernel on the first call
        base = logits(model, x)
        peft_model = with_memory(model, state, args.r)
        unmerged = logits(peft_model, x)
        merged, kept = merged_in_place(peft_model, x)
        rows.append(compare(f"{name} re-quantized merge", merged, unmerged, base, **{"effect kept per block": kept}))
        exported = logits(peft_model.merge_and_unload(dequantize=True), x)
        reference = load_model(args.model, quantization_config=quantization, device_map="cpu")[0]
        dequantize_base_model(reference)
        noise = (logits(reference, x) - base).abs().max().item()
        rows.append(compare(f"{name} float export", exported, unmerged, base, **{"kernel noise (max abs)": noise}))

    columns = ["setting", "max abs diff", "mean abs diff", "memory effect (mean abs)", "effect kept"]
    print(f"\nMerged vs unmerged logits, r={args.r}, {tokens} tokens:")
    print_table(rows, columns + ["effect kept per block", "kernel noise (max abs)"])
    path = write_results("merge_fidelity", args, {"tokens": tokens, "r": args.r, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
