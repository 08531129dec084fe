"""The paper's initialisation ablation on a real model and book, at CPU scale.

For each chunk offset and each ``init_locas_weights`` method: initialise a Locas-GLU memory (r=16) from one 256-token
chunk of Pride and Prejudice, train it on that chunk for a few AdamW steps (lr 4e-3, norm clipping after each step),
then measure the loss on the *next* 256 tokens. The paper's PG-19 ablation (Qwen3-1.7B, r=64) ranks top-K cloning
first, then random-unit and least-active cloning, with Gaussian far behind. Needs the offline assets
(``python -m peft_locas.assets``); writes ``benchmarks/results/init_ablation.json``.

    python benchmarks/init_ablation.py [--quick] [--offsets 1000,3000,6000,9000] [--steps 4] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import add_common_arguments, apply_common, book_token_ids, device, load_model, write_results
from peft import get_peft_model

from peft_locas import LocasConfig, init_locas_weights

METHODS = ("top_k", "random_clone", "bottom_k", "activation_keys", "param_norm", "gaussian")


def next_chunk_loss(base, method: str, train: torch.Tensor, next_chunk: torch.Tensor, r: int, steps: int, lr: float):
    """(loss on the next chunk, last training loss) after initialising with ``method`` and ``steps`` AdamW steps."""
    torch.manual_seed(0)
    model = get_peft_model(base, LocasConfig(r=r, init_weights="data"))
    init_locas_weights(model, [{"input_ids": train}], method=method, seed=0, show_progress_bar=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=train, labels=train).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.base_model.clip_memory_norms_()
    with torch.no_grad():
        result = model(input_ids=next_chunk, labels=next_chunk).loss.item(), loss.item()
    model.unload()  # the base model, wrappers removed, for the next method
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--offsets", default=None, help="token offsets of the training chunks (quick: one)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    apply_common(args)
    offsets = [int(o) for o in (args.offsets or ("1000" if args.quick else "1000,3000,6000,9000")).split(",")]
    base, tokenizer = load_model(args.model)
    ids = torch.tensor(
        [book_token_ids(tokenizer, "pride_and_prejudice", max(offsets) + 2 * args.chunk)], device=device()
    )
    runs = []
    for offset in offsets:
        train = ids[:, offset : offset + args.chunk]
        next_chunk = ids[:, offset + args.chunk : offset + 2 * args.chunk]
        with torch.no_grad():
            no_memory = base(input_ids=next_chunk, labels=next_chunk).loss.item()
        losses = {}
        for method in METHODS:
            start = time.perf_counter()
            losses[method], train_loss = next_chunk_loss(base, method, train, next_chunk, args.r, args.steps, args.lr)
            print(
                f"offset {offset:>5} {method:>15}: next-chunk loss {losses[method]:.4f} "
                f"(last train loss {train_loss:.4f}, {time.perf_counter() - start:.1f}s)",
                flush=True,
            )
        runs.append({"offset": offset, "no_memory": no_memory, "next_chunk_loss": losses})
    margins = [run["next_chunk_loss"]["gaussian"] - run["next_chunk_loss"]["top_k"] for run in runs]
    summary = {
        "model": args.model,
        "book": "pride_and_prejudice",
        "settings": {
            "offsets": ",".join(map(str, offsets)),
            "chunk": args.chunk,
            "steps": args.steps,
            "lr": args.lr,
            "r": args.r,
        },
        "runs": runs,
        "mean_next_chunk_loss": {m: sum(run["next_chunk_loss"][m] for run in runs) / len(runs) for m in METHODS},
        "gaussian_minus_top_k": margins,
    }
    path = write_results("init_ablation", args, summary)
    print(f"gaussian - top_k margin per offset: {', '.join(f'{m:+.4f}' for m in margins)} nats; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
