"""Where a memorisation step's time goes: `torch.profiler` over training steps of a Locas memory on the real model.

Each step is what `memorize()` does per chunk: one forward with gradients over a window (prefix + chunk) and its
backward. The profile answers two questions of the speed issue:

- does the backward compute gradients only for the memory? A weight gradient is a matrix product that contracts over
  the tokens, ``(out, T) @ (T, in)``, whose result has the weight's shape: the profile's products (with their input
  shapes) are sorted into the memory's weight gradients and frozen weights' ones, which must be none. The embedding's
  backward (``embedding_dense_backward``) must not run at all: nothing below the lowest memory needs a gradient, and
  the backward's product count shows how far down it goes (the lowest layer's attention needs none).
- how the time splits between forward and backward, and which operations dominate.

    python benchmarks/profile_step.py [--quick] [--model default|tiny|DIR] [--tokens 768] [--r 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from common import (
    add_common_arguments,
    apply_common,
    book_token_ids,
    device,
    load_model,
    print_table,
    synchronize,
    write_results,
)
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

from peft_locas import LocasConfig, LocasLayer

#: matrix products as the profiler names them (bmm: batched products; linear layers dispatch to addmm/mm)
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def products(events, parent: str) -> list:
    """The matrix-product events run inside the ``record_function`` regions named ``parent``."""
    regions = [(e.time_range.start, e.time_range.end) for e in events if e.name == parent]
    return [e for e in events if e.name in PRODUCTS and any(a <= e.time_range.start < b for a, b in regions)]


def weight_gradients(backward: list, tokens: int) -> Counter:
    """Shapes ``(out, in)`` of the backward products that contract over the ``tokens`` (weight gradients), counted."""
    shapes: Counter = Counter()
    for event in backward:
        inputs = [shape for shape in event.input_shapes if shape]
        if event.name == "aten::mm" and len(inputs) >= 2 and inputs[0][-1] == tokens and inputs[1][0] == tokens:
            shapes[(inputs[0][0], inputs[1][-1])] += 1
    return shapes


def memory_gradient_shapes(layers: list) -> dict[tuple[int, ...], int]:
    """Each shape a memory's weight gradient takes, with the number of memory matrices one such product covers: a GLU
    memory computes its gate and key rows as one ``(2r, d_in)`` product (`LocasMemory.forward`), so one gradient
    product covers both; a value (or a two-layer MLP's key) is one matrix."""
    shapes: dict[tuple[int, ...], int] = {}
    for layer in layers:
        for memory in layer.locas_memory.values():
            if memory.gate is not None:
                shapes[(2 * memory.width, memory.key.shape[1])] = 2
            else:
                shapes[tuple(memory.key.shape)] = 1
            shapes[tuple(memory.value.shape)] = 1
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=None, help="window length (default 768 = 256 + 512; quick 192)")
    parser.add_argument("--r", type=int, default=64, help="memory width")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default 3, quick 1)")
    args = parser.parse_args(argv)
    apply_common(args)
    tokens = args.tokens or (192 if args.quick else 768)
    steps = args.steps or (1 if args.quick else 3)
    base, tokenizer = load_model(args.model)
    model = get_peft_model(base, LocasConfig(r=args.r))
    ids = torch.tensor(book_token_ids(tokenizer, "emma", tokens), device=device()).unsqueeze(0)
    memories = [m for m in model.modules() if isinstance(m, LocasLayer)]
    model.train()

    def step() -> None:
        with record_function("forward"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        with record_function("backward"):
            loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device().type == "cuda" else [])
    synchronize()
    started = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize()
    seconds = time.perf_counter() - started
    events = prof.events()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    forward_us, backward_us = totals.get("forward", 0.0), totals.get("backward", 0.0)
    forward_products = len(products(events, "forward")) / steps
    backward = products(events, "backward")
    gradients = weight_gradients(backward, tokens)
    memory_shapes = memory_gradient_shapes(memories)
    frozen_shapes = {tuple(p.shape) for p in model.parameters() if not p.requires_grad} - memory_shapes.keys()
    memory_gradients = sum(n * memory_shapes[shape] for shape, n in gradients.items() if shape in memory_shapes) / steps
    frozen_gradients = sum(n for shape, n in gradients.items() if shape in frozen_shapes) / steps
    ops = sorted(
        (e for e in prof.key_averages() if e.key not in ("forward", "backward")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    self_total = sum(e.self_cpu_time_total for e in ops)
    top = [
        {"op": e.key, "calls per step": e.count / steps, "self CPU share": e.self_cpu_time_total / self_total}
        for e in ops[:10]
    ]
    print_table(top, ["op", "calls per step", "self CPU share"])
    summary = {
        "tokens": tokens,
        "r": args.r,
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "forward_share": forward_us / (forward_us + backward_us),
        "backward_share": backward_us / (forward_us + backward_us),
        "forward_products_per_step": forward_products,
        "backward_products_per_step": len(backward) / steps,
        "memory_weight_gradients_per_step": memory_gradients,
        "memory_parameters": sum(1 for m in memories for _ in m.locas_memory.parameters()),
        "frozen_weight_gradients_per_step": frozen_gradients,
        "embedding_backward_calls": sum(1 for e in events if e.name == "aten::embedding_dense_backward"),
        "frozen_parameters_with_grad": sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None),
        "top_ops": top,
    }
    print(
        f"forward {summary['forward_share']:.0%} / backward {summary['backward_share']:.0%} of a step "
        f"({summary['seconds_per_step']:.2f} s per step, profiled); matrix products: forward {forward_products:.0f}, "
        f"backward {len(backward) / steps:.0f}; weight gradients: memory {memory_gradients:.0f} (of "
        f"{summary['memory_parameters']} memory matrices), frozen {frozen_gradients:.0f}; embedding backward calls: "
        f"{summary['embedding_backward_calls']}"
    )
    path = write_results("profile_step", args, summary)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
