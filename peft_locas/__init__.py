"""Locas parametric memories for Hugging Face PEFT.

Importing this package registers the ``LOCAS`` PEFT type, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained`` and ``AutoPeftModel*`` handle Locas adapters like any built-in method.
"""

from .config import LocasConfig
from .data_init import LocasInitState, get_locas_init_state, init_locas_weights
from .layer import LocasLayer
from .model import LocasModel
from .nlsvd import compress_locas_memory
from .registration import LOCAS_PEFT_TYPE, register_locas
from .resize import grow_locas_memory

try:  # quantized bases: registers bitsandbytes layers with peft_locas.projections
    from . import bnb as _bnb  # noqa: F401
except ImportError:  # bitsandbytes is optional at run time; without it, quantized layers are simply unknown
    pass

__version__ = "0.1.0"
__all__ = [
    "LOCAS_PEFT_TYPE",
    "LocasConfig",
    "LocasInitState",
    "LocasLayer",
    "LocasModel",
    "__version__",
    "compress_locas_memory",
    "get_locas_init_state",
    "grow_locas_memory",
    "init_locas_weights",
]

register_locas(LocasConfig, LocasModel)

# test-time memorisation (score, then train) of long texts; after registration, which it relies on
from .memorization import MemorizeConfig, evaluate, memorize, templora_config  # noqa: E402
from .results import MemorizeResult  # noqa: E402

__all__ += ["MemorizeConfig", "MemorizeResult", "evaluate", "memorize", "templora_config"]

# recall: conversations as input, asking a memorised model questions
from .recall import Asker, Conversation, load_conversation, render_conversation  # noqa: E402

__all__ += ["Asker", "Conversation", "load_conversation", "render_conversation"]
