"""``peft-locas memorize --separate``: several texts, each into its own Locas memory, trained side by side in one
batched run (`peft_locas.engine.batched_memorization`). ``--out`` is a library: one adapter folder per text, named after
it, each what a single-text ``memorize`` writes (adapter, model card, ``memorize_results.json``, loss plot,
``chunks.jsonl``), so ``ask``, ``eval`` and ``merge`` take each one as they take any memory, and ``ask --memory OUT``
serves them all. A later run into the same ``--out`` adds its memories beside the ones there."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

from .inputs import Source, memories_in, plural
from .memorize import peak_memory_text, results_record, write_records
from .output import atomic_folder, no_space

#: adapter names PEFT treats specially (``"default"`` is saved at the folder's top, ``"__base__"`` means no adapter)
_RESERVED = ("default", "__base__")
#: `LocasModel.prefix` (``registration.LOCAS_PREFIX``, which imports peft; a test checks they agree): PEFT warns that
#: an adapter name contained in it may be reinitialised on load
_PREFIX = "locas_"


def adapter_names(sources: list[Source]) -> list[str]:
    """One distinct adapter name per text, from its label (a file's stem, ``stem_sample`` for a LoCoMo sample):
    characters other than letters, digits, ``_`` and ``-`` become ``_``; ``default``, ``__base__`` and names inside
    PEFT's ``locas_`` prefix get ``_text``; a repeated name gets ``_2``, ``_3``..."""
    names: list[str] = []
    for source in sources:
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", source.label).strip("_-") or "text"
        name = f"{name}_text" if name in _RESERVED or name in _PREFIX else name
        candidate, count = name, 1
        while candidate in names:
            count += 1
            candidate = f"{name}_{count}"
        names.append(candidate)
    return names


def names_line(out: Path, sources: list[Source], names: list[str]) -> str:
    """The line printed before training: where each text's memory goes (and, where the name is not the text's label,
    the file it comes from)."""
    labels = [source.label for source in sources]
    pairs = zip(sources, names, strict=True)
    shown = [
        name if name == source.label and labels.count(name) == 1 else f"{name} (from {source.path})"
        for source, name in pairs
    ]
    return f"memories in {out}: {', '.join(shown)}"


def library_line(out: Path, names: list[str], before: set[str]) -> str:
    """The line printed at the end: every memory the library now holds, saying which this run added or replaced."""
    held = [entry.name for entry in memories_in(out)]
    marks = {name: "replaced" if name in before else "new" for name in names}
    shown = [f"{name} ({marks.get(name, 'kept')})" for name in held]
    return f"{out} holds {len(held)} {plural(len(held), 'memory', 'memories')}: {', '.join(shown)}"


def run_separate(
    args: argparse.Namespace,
    sources: list[Source],
    names: list[str],
    folder: Path,
    model: Any,
    tokenizer: Any,
    config: Any,
    peft_config: Any,
    default_checkpoints: bool,
    num_chunks: list[int],
) -> int:
    """Memorise ``sources[b]`` into memory ``names[b]`` and write ``--out/<name>/`` for each (each atomically: a
    memory is complete or absent); ``num_chunks`` are the texts' chunk counts (the longest text's log prints the time
    left)."""
    from ..engine.memorization import memorize
    from .memorize import summary_table
    from .run_log import RunLog

    checkpoints = args.checkpoint_dir
    before = {entry.name for entry in memories_in(args.out)}
    longest = num_chunks.index(max(num_chunks))
    logs = {
        name: RunLog(None if checkpoints is None else checkpoints / name, chunks, True, quiet=index != longest)
        for index, (name, chunks) in enumerate(zip(names, num_chunks, strict=True))
    }

    def log(name: str, index: int, result: Any) -> None:
        logs[name](index, result)

    try:
        results = memorize(
            model,
            tokenizer,
            [s.memorized for s in sources],
            config,
            peft_config=peft_config,
            adapter_names=names,
            callback=log,
        )
    except OSError as exc:
        full = no_space(exc, checkpoints, "--checkpoint-dir", "the last complete checkpoints are kept")
        if full is None:
            raise
        raise full from exc
    peft_model = results[0].model
    total_tokens = sum(result.total_tokens for result in results)
    wall = max(result.wall_time_s for result in results)  # the batch's time: every text's record carries it
    batch = {"texts": len(names), "adapter_names": names, "tokens": total_tokens, "wall_time_s": wall}
    each = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad) // len(names)
    for name, source, result in zip(names, sources, results, strict=True):
        with atomic_folder(args.out / name, each + 2**20) as partial:  # each memory complete or absent
            peft_model.save_pretrained(partial, selected_adapters=[name])
            _lift(partial, name)
            record = results_record(args, folder, [source], source.label, ("locas", peft_config.r), config, result)
            record["settings"]["adapter_name"] = name
            record["batch"] = batch
            write_records(partial, record, result, source.label, None if checkpoints is None else checkpoints / name)
    if default_checkpoints:  # the adapter folders now hold everything; the checkpoints only served a crash
        shutil.rmtree(checkpoints, ignore_errors=True)
    for name, result in zip(names, results, strict=True):
        print(f"{name}:")
        print(summary_table(result, costs=False))
    rate = total_tokens / wall if wall > 0 else float("nan")
    texts = f"{len(names)} texts side by side" if len(names) > 1 else "1 text"
    print(f"{texts}: {total_tokens:,} tokens in {wall:.1f} s ({rate:.1f} tokens/s{peak_memory(results)})")
    print(library_line(args.out, names, before))
    return 0


def peak_memory(results: list[Any]) -> str:
    """``", peak memory X GiB (kind)"`` of a batch (the process's peak, which every text's result records), or ""."""
    measured = [r for r in results if r.peak_memory_bytes is not None]
    if not measured:
        return ""
    return f", peak memory {peak_memory_text(max(measured, key=lambda r: r.peak_memory_bytes))}"


def _lift(folder: Path, name: str) -> None:
    """PEFT saves a named adapter into ``folder/name`` (its model card at ``folder``): move its files up, so
    ``folder`` is the adapter folder and loads as ``"default"`` anywhere."""
    for entry in (folder / name).iterdir():
        entry.rename(folder / entry.name)
    (folder / name).rmdir()
