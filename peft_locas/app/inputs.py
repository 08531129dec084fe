"""Inputs checked before any model loads: texts and conversations, model and adapter folders, output folders."""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import assets
from .options import UsageError

RESULTS_FILE = "memorize_results.json"
#: the files of a folder given as ``--text``, memorised in name order
TEXT_SUFFIXES = (".txt", ".md")
#: bytes read at each end of a weights file for `base_fingerprint`
_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class Source:
    """What ``--text`` named: a plain text (``conversation`` None) or a conversation (``text`` is its rendering)."""

    text: str
    label: str
    path: Path
    conversation: Any = None  # peft_locas.recall.dialogue.Conversation
    sample: str | None = None

    @property
    def memorized(self) -> Any:
        """What `memorize()` takes: the conversation (chunked at turn starts), else the text."""
        return self.text if self.conversation is None else self.conversation

    def record(self) -> dict[str, Any]:
        """How results name the source, so `ask --context-tokens` can read the same text again."""
        return {"text": self.label, "text_path": str(self.path.resolve()), "sample": self.sample}


def read_sources(
    specs: list[str], sample: str | None = None, encoding: str = "utf-8", flag: str = "--text"
) -> list[Source]:
    """Every ``--text`` in order: a file or book (`read_source`), or a folder's ``.txt``/``.md`` files by name."""
    paths: list[str] = []
    for spec in specs:
        folder = Path(spec).expanduser()
        if folder.is_dir():
            files = sorted(str(f) for f in folder.iterdir() if f.suffix.lower() in TEXT_SUFFIXES and f.is_file())
            if not files:
                raise UsageError(f"{flag} {spec} is a folder with no {' or '.join(TEXT_SUFFIXES)} file in it")
            paths += files
        else:
            paths.append(spec)
    if sample is not None and len(paths) > 1:
        raise UsageError(f"--sample picks from one LoCoMo file; {flag} names {len(paths)} files")
    return [read_source(path, sample, encoding, flag) for path in paths]


def read_source(spec: str, sample: str | None = None, encoding: str = "utf-8", flag: str = "--text") -> Source:
    """A text file (decoded with ``encoding``), a prepared book named by its slug, or a conversation (``.json``
    LoCoMo sample(s), ``.jsonl``: UTF-8 as JSON requires)."""
    path = Path(spec).expanduser()
    if not path.exists() and spec in assets.ALL_BOOKS:
        book = assets.book_path(spec)
        if book is None:
            raise UsageError(f"book {spec!r} is not prepared: run `peft-locas assets` first")
        path = book
    if path.is_dir():
        raise UsageError(f"{flag} {spec} is a folder: give a text file (or a book: {', '.join(assets.ALL_BOOKS)})")
    if not path.is_file():
        raise UsageError(f"text file {spec} not found (give a file, or a book: {', '.join(assets.ALL_BOOKS)})")
    from ..recall.dialogue import is_conversation_file  # no torch: cheap

    if is_conversation_file(path):
        return _read_conversation(path, sample)
    if sample is not None:
        raise UsageError(f"--sample applies to conversations (.json/.jsonl); {path} is a plain text")
    data = path.read_bytes()
    if not data.strip():
        raise UsageError(f"text file {path} is empty")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
        raise UsageError(
            f"{path} is not a {name} text file (undecodable byte at offset {exc.start}): give its encoding with "
            "--encoding (e.g. --encoding latin-1)"
        ) from exc
    if "\x00" in text:
        raise UsageError(f"{path} is not a text file (it contains NUL bytes)")
    return Source(text, path.stem, path)


def _read_conversation(path: Path, sample: str | None) -> Source:
    from ..recall.dialogue import DialogueError, load_conversation, render_conversation

    try:
        conversation = load_conversation(path, sample)
    except DialogueError as exc:
        raise UsageError(str(exc)) from exc
    label = path.stem if conversation.sample_id is None else f"{path.stem}:{conversation.sample_id}"
    return Source(render_conversation(conversation), label, path, conversation, conversation.sample_id)


def model_dir(path: Path | None, adapter: Path | None = None) -> Path:
    """``--model``; else the base the adapter recorded (when it is a local model folder); else the prepared SmolLM2.
    With an adapter whose results recorded its base's `base_fingerprint`, a base with other weights is refused."""
    folder = _model_dir(path, adapter)
    record = (memorize_record(adapter) if adapter is not None else None) or {}
    recorded = record.get("base_fingerprint")
    if recorded is not None and base_fingerprint(folder) != recorded:
        made_on = record.get("model", "another model")
        raise UsageError(
            f"adapter {adapter} was made on another base model ({made_on}): the weights in {folder} differ from those "
            "it recorded; pass the base it was made on with --model"
        )
    return folder


def shared_base(path: Path | None, adapters: list[Path]) -> Path:
    """`model_dir` for several adapters at once: ``--model`` or the first adapter's recorded base, which every
    adapter's recorded fingerprint must accept."""
    folder = model_dir(path, adapters[0])
    for adapter in adapters[1:]:
        model_dir(folder, adapter)
    return folder


def _model_dir(path: Path | None, adapter: Path | None) -> Path:
    if path is None and adapter is not None:
        recorded = recorded_base(adapter)
        if recorded is not None:
            return recorded
    if path is None:
        folder = assets.default_model_dir()
        if folder is None:
            raise UsageError("the default model is not prepared: run `peft-locas assets`, or pass --model FOLDER")
        return folder
    if not (path / "config.json").is_file():
        what = f"{path} has no config.json" if path.is_dir() else f"model folder {path} not found"
        raise UsageError(
            f"{what}: --model takes a local model folder, models are never downloaded; `peft-locas assets` prepares "
            "the default one"
        )
    return path


def base_fingerprint(folder: Path) -> str | None:
    """A cheap identity of a model folder's weights: SHA-256 over each ``*.safetensors`` file's name, size and first
    and last MiB (the header naming every tensor's dtype, shape and offset, and weight bytes at both ends), so two
    bases of the same shape (a base model and its fine-tune) differ, while copies and quantized loads of one folder
    agree. ``None`` for a folder without safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                handle.seek(size - _FINGERPRINT_BYTES)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def recorded_base(adapter: Path) -> Path | None:
    """The local base model folder an adapter was made on (``base_model_name_or_path``), if it still exists."""
    try:
        recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = Path(recorded).expanduser() if isinstance(recorded, str) and recorded else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


#: files whose presence marks a folder as an output of ours (or a model/adapter folder), which --overwrite replaces
_OUTPUT_MARKERS = ("adapter_config.json", "config.json", RESULTS_FILE)


def check_out(out: Path, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Refuse an ``--out`` that is a file, is one of the command's ``inputs``, or is a non-empty folder without
    ``--overwrite``; ``--overwrite`` replaces only a folder that holds an output (a model or adapter folder)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    for source in inputs:
        if source is not None and out.resolve() == source.resolve():
            raise UsageError(f"--out {out} is also an input of this command: write the result to another folder")
    if out.is_dir() and any(out.iterdir()):
        if inside := memories_in(out):  # --overwrite never replaces a library whole, so it is no fix to offer
            raise UsageError(
                f"--out {out} is a folder of {len(inside)} {plural(len(inside), 'memory', 'memories')} "
                f"({', '.join(e.name for e in inside)}): write to a new folder inside it ({out}/NAME) or choose "
                f"another --out (memorize --separate --out {out} adds memories to it)"
            )
        if not overwrite:
            raise UsageError(f"--out {out} exists and is not empty: pass --overwrite to replace it, or choose another")
        if not _is_output(out):
            raise UsageError(
                f"--out {out} is not a model or adapter folder (no {', '.join(_OUTPUT_MARKERS)}): --overwrite replaces "
                "only those; choose another --out"
            )


def _is_output(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in _OUTPUT_MARKERS)


def plural(count: int, one: str, many: str | None = None) -> str:
    """``one`` or ``many`` (default ``one + "s"``) as ``count`` needs."""
    return one if count == 1 else many or f"{one}s"


def memories_in(folder: Path) -> list[Path]:
    """The adapter folders directly inside ``folder`` (a library of memories, as ``memorize --separate`` writes),
    sorted by name; empty for an adapter folder itself or anything else."""
    if not folder.is_dir() or (folder / "adapter_config.json").is_file():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and (entry / "adapter_config.json").is_file())


def check_library_out(out: Path, names: list[str], overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """``--out`` of ``memorize --separate``: a folder of memories, one subfolder per text. It may already hold other
    memories (they are kept: a later run adds to the library); a memory of the same name is replaced only with
    ``--overwrite``. Refuses a file, an input of the command, and a model or adapter folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    for source in inputs:
        if source is not None and out.resolve() == source.resolve():
            raise UsageError(f"--out {out} is also an input of this command: write the memories to another folder")
    if _is_output(out):
        raise UsageError(
            f"--out {out} is a model or adapter folder; --separate writes a folder of memories (one subfolder per "
            "text): choose another --out"
        )
    taken = [name for name in names if (out / name).exists()]
    for name in taken:
        if not _is_output(out / name):
            raise UsageError(
                f"{out / name} is not a memory folder, so --overwrite leaves it: move it or rename the text"
            )
    if taken and not overwrite:
        raise UsageError(
            f"--out {out} already holds {', '.join(taken)}: pass --overwrite to replace "
            f"{'them' if len(taken) > 1 else 'it'}, or choose another --out (each memory is named after its text's "
            "file or book)"
        )


#: what an adapter folder holds, as PEFT's `save_pretrained` writes it
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_config(adapter: Path, library_hint: str = "") -> Any:
    """The adapter's ``PeftConfig`` (imports peft: call it once the cheap checks have passed).

    Raises:
        UsageError: ``adapter`` is missing, a file, a library of memories (``library_hint`` is appended to that
            message), or a folder without PEFT's two files.
    """
    missing = [name for name in _ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        if inside := memories_in(adapter):
            names = ", ".join(entry.name for entry in inside)
            raise UsageError(
                f"{adapter} is a folder of {len(inside)} {plural(len(inside), 'memory', 'memories')} ({names}), not "
                f"one adapter: give one of them, e.g. {inside[0]}{library_hint}"
            )
        if not adapter.exists():
            raise UsageError(f"adapter folder {adapter} not found")
        if not adapter.is_dir():
            raise UsageError(f"{adapter} is a file, not an adapter folder (one holding {' and '.join(_ADAPTER_FILES)})")
        if (adapter / "config.json").is_file():
            raise UsageError(
                f"{adapter} is a model folder (it has config.json), not an adapter folder: give it as --model "
                "(a merged checkpoint needs no --adapter)"
            )
        raise UsageError(f"{adapter} is not an adapter folder: it has no {' or '.join(missing)}")
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(adapter)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{adapter}/adapter_config.json is not a readable PEFT adapter config ({exc})") from exc


def memorize_record(adapter: Path) -> dict[str, Any] | None:
    """The adapter's ``memorize_results.json`` (written by ``peft-locas memorize``), or None."""
    try:
        return json.loads((adapter / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
