"""Inputs checked before any model loads: texts and conversations, model and adapter folders, output folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import assets
from .options import UsageError

RESULTS_FILE = "memorize_results.json"


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


def read_source(spec: str, sample: str | None = None, encoding: str = "utf-8", flag: str = "--text") -> Source:
    """A text file, a prepared book named by its slug, or a conversation (``.json`` LoCoMo sample(s), ``.jsonl``)."""
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
        raise UsageError(f"{path} is not a UTF-8 text file (undecodable byte at offset {exc.start})") from exc
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
    """``--model``; else the base the adapter recorded (when it is a local model folder); else the prepared SmolLM2."""
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
        raise UsageError(
            f"model folder {path} not found (no config.json there): --model takes a local folder, models are never "
            "downloaded; `peft-locas assets` prepares the default one"
        )
    return path


def recorded_base(adapter: Path) -> Path | None:
    """The local base model folder an adapter was made on (``base_model_name_or_path``), if it still exists."""
    try:
        recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = Path(recorded).expanduser() if isinstance(recorded, str) and recorded else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty: pass --overwrite to write into it, or choose another")


def adapter_config(adapter: Path) -> Any:
    """The adapter's ``PeftConfig`` (imports peft: call it once the cheap checks have passed)."""
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UsageError(
            f"adapter folder {adapter} not found (needs adapter_config.json and adapter_model.safetensors)"
        )
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
