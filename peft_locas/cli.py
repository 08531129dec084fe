"""The ``peft-locas`` command line (also ``python -m peft_locas``); the commands live in `peft_locas.app`.

``memorize`` writes a text or a conversation into a Locas memory (or a TempLoRA LoRA baseline); ``merge`` bakes an
adapter into a vanilla checkpoint; ``eval`` measures a text's chunked perplexity; ``ask`` and ``chat`` put questions to
a memorised model; ``assets`` prepares the offline default model and books. Models and tokenizers load from local
folders only.
"""

from __future__ import annotations

from .app.inputs import RESULTS_FILE
from .app.main import build_parser, main
from .app.memorize import PLOT_FILE, summary_table
from .app.options import UsageError

__all__ = ["PLOT_FILE", "RESULTS_FILE", "UsageError", "build_parser", "main", "summary_table"]
