"""The model card (``README.md``) that ``save_pretrained`` writes beside a Locas adapter says what loading it needs.

PEFT writes the card in ``PeftModel.create_or_update_model_card`` (library tag, base model, PEFT version); nothing in
it tells a reader, on the Hub or in a folder, that ``LOCAS`` is not one of PEFT's own methods. `install` wraps that
method once, at registration: after PEFT's card is written, a card of a model holding a Locas adapter gains the tag
``locas`` and one marked section, right under its title, naming the package to install. Cards of other adapters are
left exactly as PEFT writes them, and saving again does not repeat the section.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: Opens the section this module adds; its presence means the section is there already.
MARKER = "<!-- peft-locas: what loading this adapter needs -->"
TAG = "locas"
SECTION = f"""{MARKER}
> **A [Locas](https://arxiv.org/abs/2602.05085) memory adapter.** `LOCAS` is not one of PEFT's built-in methods:
> loading this adapter needs the peft-locas package (`pip install peft-locas`, or `pip install -e .` in a clone of its
> repository). Once it is installed, PEFT (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`), transformers'
> `load_adapter` and lm-eval's `peft=` argument find the `LOCAS` type by themselves; without it they fail with
> `KeyError: 'LOCAS'`. A merged checkpoint (`merge_and_unload()`) is a plain transformers model and needs neither.
"""


def add_install_note(card_path: str | Path) -> None:
    """Add the ``locas`` tag and the install section (`SECTION`, under the first ``# `` title, else on top of the text)
    to the model card at ``card_path``; a card that has the section already is left as it is."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    if MARKER in card.text:
        return
    lines = card.text.splitlines()
    title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    at = 0 if title is None else title + 1
    card.text = "\n".join([*lines[:at], "", SECTION.rstrip("\n"), *lines[at:]]) + "\n"
    card.data.tags = sorted({*(card.data.tags or []), TAG})
    card.save(card_path)


def install() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` so that cards of models holding a Locas adapter get the install
    note (idempotent)."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_adds_locas_note", False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str) -> None:
        original(self, output_dir)
        if any(_is_locas(config) for config in getattr(self, "peft_config", {}).values()):
            add_install_note(Path(output_dir) / "README.md")

    create_or_update_model_card._adds_locas_note = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _is_locas(config) -> bool:
    return getattr(getattr(config, "peft_type", None), "name", None) == "LOCAS"
