"""Composition: two novels memorised separately, then composed into one memory (``add_weighted_adapter(...,
combination_type="cat")``, weights 1 and 1) and merged into one vanilla checkpoint. Does the composed memory still
hold each book?

Each book's first ``--tokens`` tokens are memorised into Locas r=64 ``top_k`` with `book_ppl.py`'s protocol (short
window, 2 steps per chunk; the memories are checkpointed in ``--work`` and reused). Then every model reads each book
again with the same short window, nothing trained (`peft_locas.evaluate`): the base, each book's own memory, the other
book's memory, the composed memory, and the merged composed model. Reported: that perplexity per book and model, and
the share of the own memory's gain over the base that the composed memory keeps,
``(ppl_base - ppl_composed) / (ppl_base - ppl_own)``.

    python benchmarks/compose.py [--quick] [--books pride_and_prejudice,persuasion] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from book_ppl import add_protocol_arguments, locas_spec, memorize_run
from common import add_common_arguments, apply_common, book_token_ids, finish, load_model, set_work, start_clock
from peft import PeftModel

from peft_locas import evaluate

COLUMNS = ["book", "base", "own memory", "other memory", "composed", "merged composed", "gain kept"]


def memory_folder(book: str, ids: list[int], base, tokenizer, args: argparse.Namespace) -> Path:
    """The book's memory as a saved adapter in ``--work`` (trained here when missing, resumably)."""
    folder = Path(args.work) / f"{book}__locas_r{args.r}__{len(ids)}.adapter"
    if not (folder / "adapter_model.safetensors").is_file():
        print(f"memorising {book} ({len(ids)} tokens) into Locas r={args.r}", flush=True)
        spec = {**locas_spec(args.r, "top_k"), "book": book, "tokens": len(ids)}
        result = memorize_run(copy.deepcopy(base), tokenizer, ids, spec, args)
        result.model.save_pretrained(folder)
    return folder


def perplexity(model, ids: list[int], args: argparse.Namespace) -> float:
    return evaluate(model, None, ids, chunk_tokens=args.chunk, context_tokens=args.context).perplexity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--books", default="pride_and_prejudice,persuasion", help="two prepared novels")
    parser.add_argument("--tokens", type=int, default=None, help="tokens memorised per book (default 8192, quick 2048)")
    parser.add_argument("--r", type=int, default=64, help="memory width of each book's memory")
    add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    apply_common(args)
    books = args.books.split(",")
    if len(books) != 2:
        raise SystemExit(f"error: --books takes two novels, got {len(books)}")
    args.tokens = args.tokens or (2048 if args.quick else 8192)
    set_work(args, "compose")
    start_clock(args)

    base, tokenizer = load_model(args.model)
    texts = {book: book_token_ids(tokenizer, book, args.tokens) for book in books}
    folders = {book: memory_folder(book, ids, base, tokenizer, args) for book, ids in texts.items()}
    names = {book: f"memory_{index}" for index, book in enumerate(books)}  # adapter names free of PEFT's prefix
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[books[0]], adapter_name=names[books[0]])
    model.load_adapter(folders[books[1]], adapter_name=names[books[1]])
    model.add_weighted_adapter([names[b] for b in books], [1.0, 1.0], "composed")
    model.eval()

    table: dict[str, dict[str, Any]] = {book: {"book": book} for book in books}
    with torch.no_grad():
        for book, ids in texts.items():
            other = books[1 - books.index(book)]
            with model.disable_adapter():
                table[book]["base"] = perplexity(model, ids, args)
            adapters = {"own memory": names[book], "other memory": names[other], "composed": "composed"}
            for column, adapter in adapters.items():
                model.set_adapter(adapter)
                table[book][column] = perplexity(model, ids, args)
        model.set_adapter("composed")
        for name in names.values():
            model.delete_adapter(name)
        merged = model.merge_and_unload()
        for book, ids in texts.items():
            row = table[book]
            row["merged composed"] = perplexity(merged, ids, args)
            row["gain kept"] = (row["base"] - row["composed"]) / (row["base"] - row["own memory"])
    return finish("compose", args, list(table.values()), COLUMNS, {"tokens": args.tokens, "r": args.r})


if __name__ == "__main__":
    sys.exit(main())
