"""Importing this module registers the LOCAS PEFT type (and bitsandbytes layer support) with PEFT, and makes the model
card of a saved Locas adapter say what loading it needs (`peft_locas.tuner.model_card`); it runs once.

Kept apart from ``peft_locas/__init__.py`` so that importing the package stays cheap (no torch, no PEFT): `_hook`
imports this module as soon as PEFT is imported, and every public name of the package imports it first.
"""

from .tuner import model_card
from .tuner.config import LocasConfig
from .tuner.model import LocasModel
from .tuner.registration import register_locas

register_locas(LocasConfig, LocasModel)
model_card.install()

try:  # quantized bases: registers bitsandbytes layers with peft_locas.weights.projections
    from .weights import bnb as _bnb  # noqa: F401
except ImportError:  # bitsandbytes is optional at run time; without it, quantized layers are simply unknown
    pass
