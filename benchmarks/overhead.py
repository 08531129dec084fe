"""Inference and training overhead of Locas memories against the base model and LoRA, side by side.

Measures, on one sequence of real text, the forward time (tokens/s) of: the base model, Locas unmerged at
r = 16, 64, 256, Locas r=64 merged, and LoRA r=64 on every linear layer (the TempLoRA baseline); the per-token time
of decoding after that sequence (KV cache) for the base, Locas r=64 unmerged and merged, and LoRA r=64; the time of
one training step (forward, backward, AdamW) for Locas r=64 and LoRA r=64; and the time of ``init_locas_weights``
relative to one plain forward over the same tokens. Variants alternate in interleaved rounds; a ratio is the median of
the per-round ratios, with their range, and CPU time is reported beside wall time. Each overhead is compared with its
arithmetic limit, the extra FLOPs of the added units relative to the base model's (merged units are charged the same
FLOPs as unmerged ones; the merged model saves the separate small matrix products and the addition).

    python benchmarks/overhead.py [--quick] [--model default|tiny|DIR] [--tokens 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from common import (
    add_common_arguments,
    apply_common,
    book_token_ids,
    device,
    load_model,
    median_seconds,
    print_table,
    round_ratios,
    timed_rounds,
    write_results,
)
from peft import LoraConfig, get_peft_model

from peft_locas import LocasConfig, LocasLayer
from peft_locas.init.data import init_locas_weights

LOCAS_WIDTHS = (16, 64, 256)
DECODE_TOKENS = 16  # one-token forwards per timed decoding round


def linear_flops_per_token(model: torch.nn.Module) -> int:
    """Multiply-adds x 2 of every linear layer (lm_head included) for one token."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(model: torch.nn.Module, tokens: int) -> int:
    """Scores and weighted sum over on average tokens/2 causal positions, per token, summed over layers."""
    config = model.config
    return 2 * 2 * (tokens // 2) * config.num_attention_heads * config.head_dim * config.num_hidden_layers


def locas_parameters(model: torch.nn.Module, adapter: str) -> int:
    """Gate (GLU only), key and value rows of every wrapped block; each costs 2 FLOPs per token."""
    return sum(
        sum(p.numel() for p in m.locas_memory[adapter].parameters())
        for m in model.modules()
        if isinstance(m, LocasLayer) and adapter in m.locas_memory
    )


def lora_parameters(model: torch.nn.Module) -> int:
    """A and B of every LoRA layer; each costs 2 FLOPs per token."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="sequence length (default 512, quick 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    args = parser.parse_args(argv)
    apply_common(args)
    tokens = args.tokens or (128 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.manual_seed(args.seed)

    base, tokenizer = load_model(args.model)
    x = torch.tensor([book_token_ids(tokenizer, "pride_and_prejudice", tokens)], device=device())
    locas = get_peft_model(copy.deepcopy(base), LocasConfig(r=LOCAS_WIDTHS[0], init_weights=False), adapter_name="r16")
    for r in LOCAS_WIDTHS[1:]:
        locas.add_adapter(f"r{r}", LocasConfig(r=r, init_weights=False))
    merged = get_peft_model(copy.deepcopy(base), LocasConfig(r=64, init_weights=False)).merge_and_unload()
    lora_config = LoraConfig(r=64, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), lora_config)

    def forward(model: torch.nn.Module, adapter: str | None = None):
        def run() -> None:
            if adapter is not None:
                model.set_adapter(adapter)
            with torch.no_grad():
                model(x)

        return run

    inference = {"base": forward(base)}
    inference.update({f"locas r={r}": forward(locas, f"r{r}") for r in LOCAS_WIDTHS})
    inference["locas r=64 merged"] = forward(merged)
    inference["lora r=64"] = forward(lora)
    inference_rounds = timed_rounds(inference, repeats)

    def decode(model: torch.nn.Module, adapter: str | None = None):
        """``DECODE_TOKENS`` one-token forwards after the sequence (its KV cache prefilled once, cropped back after
        every call): the per-token cost of generation, where the memory's rows are read for a single token."""
        if adapter is not None:
            model.set_adapter(adapter)
        with torch.no_grad():
            cache = model(x, use_cache=True).past_key_values

        def run() -> None:
            if adapter is not None:
                model.set_adapter(adapter)
            with torch.no_grad():
                for _ in range(DECODE_TOKENS):
                    model(x[:, -1:], past_key_values=cache, use_cache=True)
                cache.crop(-DECODE_TOKENS)  # back to the prefilled sequence

        return run

    decoding = {"base": decode(base), "locas r=64": decode(locas, "r64"), "locas r=64 merged": decode(merged)}
    decoding["lora r=64"] = decode(lora)
    decode_rounds = timed_rounds(decoding, repeats)

    locas.set_adapter("r64")
    training_models = {"locas r=64": locas, "lora r=64": lora}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in training_models.items()
    }

    def train_step(name: str):
        def run() -> None:
            model = training_models[name]
            model.train()
            model(input_ids=x, labels=x).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            model.eval()

        return run

    training_rounds = timed_rounds({name: train_step(name) for name in training_models}, repeats)

    init_model = get_peft_model(copy.deepcopy(base), LocasConfig(r=64))
    batch = [{"input_ids": x}]
    init_seconds = median_seconds(
        {
            "plain forward": forward(base),
            "init_locas_weights top_k": lambda: init_locas_weights(init_model, batch, show_progress_bar=False),
        },
        repeats,
    )

    base_flops = linear_flops_per_token(base) + attention_flops_per_token(base, tokens)
    extra_parameters = {f"locas r={r}": locas_parameters(locas, f"r{r}") for r in LOCAS_WIDTHS}
    extra_parameters["locas r=64 merged"] = extra_parameters["locas r=64"]
    extra_parameters["lora r=64"] = lora_parameters(lora)

    def ratio_row(rounds: dict[str, list[tuple[float, float]]], name: str, reference: str) -> dict[str, Any]:
        ratios = round_ratios(rounds, name, reference)
        low, high = ratios["wall range"]
        return {"time vs base": ratios["wall"], "wall range": f"{low:.3f}-{high:.3f}", "CPU vs base": ratios["cpu"]}

    rows = []
    for name, times in inference_rounds.items():
        rows.append(
            {
                "variant": name,
                "tokens/s": tokens / statistics.median(wall for wall, _ in times),
                **ratio_row(inference_rounds, name, "base"),
                "arithmetic limit": 1 + 2 * extra_parameters.get(name, 0) / base_flops,
                "extra params": extra_parameters.get(name, 0),
            }
        )
    columns = ["variant", "tokens/s", "time vs base", "wall range", "CPU vs base", "arithmetic limit", "extra params"]
    print(f"\nInference, {tokens} tokens, {repeats} interleaved rounds (medians of per-round ratios):")
    print_table(rows, columns)
    decode_rows = [
        {
            "variant": name,
            "tokens/s": DECODE_TOKENS / statistics.median(wall for wall, _ in times),
            **ratio_row(decode_rounds, name, "base"),
        }
        for name, times in decode_rounds.items()
    ]
    print(f"\nDecoding one token at a time after {tokens} tokens ({DECODE_TOKENS} tokens per round):")
    print_table(decode_rows, ["variant", "tokens/s", "time vs base", "wall range", "CPU vs base"])
    training_rows = []
    for name, times in training_rounds.items():
        ratios = round_ratios(training_rounds, name, "lora r=64")
        training_rows.append(
            {
                "variant": name,
                "step seconds": statistics.median(wall for wall, _ in times),
                "vs lora": ratios["wall"],
                "CPU vs lora": ratios["cpu"],
                "trainable params": extra_parameters[name],
                "params + AdamW state MB": 3 * 4 * extra_parameters[name] / 2**20,
            }
        )
    print(f"\nTraining step (forward, backward, AdamW), {tokens} tokens:")
    columns = ["variant", "step seconds", "vs lora", "CPU vs lora", "trainable params", "params + AdamW state MB"]
    print_table(training_rows, columns)
    init_ratio = init_seconds["init_locas_weights top_k"] / init_seconds["plain forward"]
    print(f"\ninit_locas_weights(top_k) takes {init_ratio:.2f}x one plain forward over the same {tokens} tokens")

    path = write_results(
        "overhead",
        args,
        {
            "tokens": tokens,
            "repeats": repeats,
            "inference": rows,
            "decode_tokens": DECODE_TOKENS,
            "decode": decode_rows,
            "training": training_rows,
            "init_seconds": init_seconds,
            "init_vs_forward": init_ratio,
        },
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
