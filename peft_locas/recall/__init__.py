"""Recall: memorised texts as conversations and questions, asking a memorised model, and scoring its answers.

- `peft_locas.recall.dialogue`: conversations (LoCoMo JSON, a turns JSONL form) and their one rendered text.
- `peft_locas.recall.asking`: `Asker`, questions to a (memorised) model over a shared, prefilled context.
- `peft_locas.recall.metrics`: LoCoMo's official token F1 and standard errors.
"""

from .asking import Answer, Asker, Chat, fit_context
from .dialogue import (
    Conversation,
    DialogueError,
    Question,
    Session,
    Turn,
    TurnSpan,
    load_conversation,
    read_questions,
    render_conversation,
    turn_spans,
)
from .metrics import CATEGORIES, locomo_f1, mean_with_stderr, token_f1

__all__ = [
    "CATEGORIES",
    "Answer",
    "Asker",
    "Chat",
    "Conversation",
    "DialogueError",
    "Question",
    "Session",
    "Turn",
    "TurnSpan",
    "fit_context",
    "load_conversation",
    "locomo_f1",
    "mean_with_stderr",
    "read_questions",
    "render_conversation",
    "token_f1",
    "turn_spans",
]
