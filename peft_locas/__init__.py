"""Locas parametric memories for Hugging Face PEFT.

Importing this package makes ``LOCAS`` a PEFT method as soon as PEFT is imported (at once, if it already is), so
``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and ``AutoPeftModel*`` handle Locas
adapters like any built-in method. Where peft-locas is installed, processes that never import it get the same: its
``peft_locas_autoload.pth`` file hands over to this package when PEFT is imported (``PEFT_LOCAS_NO_AUTOLOAD=1`` turns
that off; see `peft_locas._hook`). The package itself imports lazily: ``import peft_locas`` loads neither torch nor
PEFT; each public name below is imported on first use (after registering LOCAS), as transformers does for its own.

Where things are, bottom up: `weights` (MLP block layouts, projections of every type, one memory's parameters,
export), `tuner` (the PEFT config, layer, model, composition and registration), `init` (initialising memories from the
model and from data), `engine` (memorising a text chunk by chunk), `recall` (conversations, asking a memorised
model), `app` (the command line, one module per command); `assets` prepares the real model and books offline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _hook

__version__ = "0.1.0"

#: public name -> the module defining it
_EXPORTS = {
    "LOCAS_PEFT_TYPE": ".tuner.registration",
    "register_locas": ".tuner.registration",
    "LocasConfig": ".tuner.config",
    "LocasLayer": ".tuner.layer",
    "LocasModel": ".tuner.model",
    "LocasInitState": ".init.data",
    "get_locas_init_state": ".init.data",
    "init_locas_weights": ".init.data",
    "compress_locas_memory": ".init.nlsvd",
    "grow_locas_memory": ".init.writing",
    # test-time memorisation (score, then train) of long texts
    "MemorizeConfig": ".engine.memorization",
    "evaluate": ".engine.memorization",
    "memorize": ".engine.memorization",
    "templora_config": ".engine.memorization",
    "MemorizeResult": ".engine.results",
    # recall: conversations as input, asking a memorised model questions
    "Asker": ".recall",
    "Conversation": ".recall",
    "load_conversation": ".recall",
    "render_conversation": ".recall",
}
__all__ = [
    "__version__",
    "Asker",
    "Conversation",
    "LOCAS_PEFT_TYPE",
    "LocasConfig",
    "LocasInitState",
    "LocasLayer",
    "LocasModel",
    "MemorizeConfig",
    "MemorizeResult",
    "compress_locas_memory",
    "evaluate",
    "get_locas_init_state",
    "grow_locas_memory",
    "init_locas_weights",
    "load_conversation",
    "memorize",
    "render_conversation",
    "templora_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _hook.ensure_registered()  # a Locas class is never handed out before PEFT knows the LOCAS type
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .engine.memorization import MemorizeConfig, evaluate, memorize, templora_config
    from .engine.results import MemorizeResult
    from .init.data import LocasInitState, get_locas_init_state, init_locas_weights
    from .init.nlsvd import compress_locas_memory
    from .init.writing import grow_locas_memory
    from .recall.asking import Asker
    from .recall.dialogue import Conversation, load_conversation, render_conversation
    from .tuner.config import LocasConfig
    from .tuner.layer import LocasLayer
    from .tuner.model import LocasModel
    from .tuner.registration import LOCAS_PEFT_TYPE, register_locas  # noqa: F401 (public, not in __all__)

_hook.install()
