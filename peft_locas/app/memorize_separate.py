"""``peft-locas memorize --separate``: several texts, each into its own Locas memory, trained side by side in one
batched run (`peft_locas.batched_memorization`); ``--out`` gets one adapter folder per text, each what a single-text
``memorize`` writes (adapter, ``memorize_results.json``, loss plot, ``chunks.jsonl``), so ``ask``, ``eval`` and
``merge`` take each one as they take any memory."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

from .inputs import Source
from .memorize import results_record, write_records
from .output import atomic_folder, no_space

#: adapter names PEFT treats specially (``"default"`` is saved at the folder's top, ``"__base__"`` means no adapter)
_RESERVED = ("default", "__base__")


def adapter_names(sources: list[Source]) -> list[str]:
    """One distinct folder-safe adapter name per text, from its label (a file's stem, ``stem_sample`` for a LoCoMo
    sample): characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``; a repeated name gets ``_2``,
    ``_3``...; PEFT's reserved names get ``_text``."""
    names: list[str] = []
    for source in sources:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.label).strip("._") or "text"
        name = f"{name}_text" if name in _RESERVED else name
        candidate, count = name, 1
        while candidate in names:
            count += 1
            candidate = f"{name}_{count}"
        names.append(candidate)
    return names


def run_separate(
    args: argparse.Namespace,
    sources: list[Source],
    folder: Path,
    model: Any,
    tokenizer: Any,
    config: Any,
    peft_config: Any,
    default_checkpoints: bool,
    num_chunks: list[int],
) -> int:
    """Memorise every source into its own memory and write ``--out/<name>/`` for each (atomically, all together);
    ``num_chunks`` are the texts' chunk counts (the longest text's log prints the time left and resumes)."""
    from ..memorization import memorize
    from .memorize import summary_table
    from .run_log import RunLog

    names = adapter_names(sources)
    checkpoints = args.checkpoint_dir
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
    needed = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad) + 2**20 * len(names)
    with atomic_folder(args.out, needed) as partial:
        for name, source, result in zip(names, sources, results, strict=True):
            adapter = partial / name
            peft_model.save_pretrained(partial, selected_adapters=[name])  # PEFT writes a named adapter to partial/name
            record = results_record(args, folder, [source], source.label, ("locas", peft_config.r), config, result)
            write_records(adapter, record, result, source.label, None if checkpoints is None else checkpoints / name)
    if default_checkpoints:  # the adapter folders now hold everything; the checkpoints only served a crash
        shutil.rmtree(checkpoints, ignore_errors=True)
    for name, result in zip(names, results, strict=True):
        print(f"{name}:")
        print(summary_table(result))
    print(f"{len(names)} memories (adapters, results and plots): {', '.join(str(args.out / n) for n in names)}")
    return 0
