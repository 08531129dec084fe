"""Recall: memorised texts as conversations and questions, asking a memorised model, and scoring its answers.

- `peft_locas.recall.dialogue`: conversations (LoCoMo JSON, a turns JSONL form) and their one rendered text.
- `peft_locas.recall.asking`: `Asker`, questions to a (memorised) model over a shared, prefilled context.
- `peft_locas.recall.prompts`: the instructions questions are asked with, and `fit_context`.
- `peft_locas.recall.prefix_cache`: `PrefixCache`, a prefix prefilled once and continued from copies of its cache.
- `peft_locas.recall.attention`: shared-prefix attention, a batch's common context kept once (Hydragen's decomposition).
- `peft_locas.recall.metrics`: LoCoMo's official token F1 and standard errors.
- `peft_locas.recall.serving`: `ask_memories`, many memories answering in one batch (per-row ``adapter_names``).
"""

import importlib
from typing import Any

# lazy, as the top-level package: the CLI reads conversations and questions (dialogue.py) without importing torch
_EXPORTS = {
    **dict.fromkeys(("Answer", "Asker", "Chat"), ".asking"),
    **dict.fromkeys(
        ("CONTEXT_INSTRUCTION", "MEMORY_INSTRUCTION", "TEXT_MEMORY_INSTRUCTION", "fit_context", "memory_instruction"),
        ".prompts",
    ),
    "PrefixCache": ".prefix_cache",
    **dict.fromkeys(
        (
            "Conversation",
            "DialogueError",
            "Question",
            "Session",
            "Turn",
            "TurnSpan",
            "load_conversation",
            "read_questions",
            "render_conversation",
            "turn_spans",
        ),
        ".dialogue",
    ),
    **dict.fromkeys(("CATEGORIES", "locomo_f1", "mean_with_stderr", "token_f1"), ".metrics"),
    "ask_memories": ".serving",
}

__all__ = sorted(_EXPORTS)  # every lazy name is public


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
