"""Make ``LOCAS`` a PEFT method: extend ``PeftType`` and fill PEFT's registries.

The enum member's *value* is what PEFT writes as ``"peft_type"`` into ``adapter_config.json``. A process that has not
imported ``peft_locas`` looks that string up in ``PEFT_TYPE_TO_CONFIG_MAPPING`` and fails with ``KeyError: <value>``,
so the value itself carries the fix: that is the only text such a process shows, because none of our code runs there.
"""

from __future__ import annotations

from peft.utils import PeftType

from ._enum import add_enum_member

LOCAS_PREFIX = "locas_"
LOCAS_PEFT_TYPE_VALUE = "LOCAS (install peft-locas and `import peft_locas` to load this adapter)"
#: ``PeftType.LOCAS``: the PEFT type of every Locas adapter; its value is written as ``peft_type`` in adapter configs.
LOCAS_PEFT_TYPE = add_enum_member(PeftType, "LOCAS", LOCAS_PEFT_TYPE_VALUE)


def register_locas(config_cls: type, model_cls: type) -> None:
    """Register the Locas config and tuner with PEFT (idempotent, so re-imports and reloads are harmless).

    ``peft.utils.register_peft_method`` cannot be used: it requires the enum value to equal the method name. The
    same three registries are filled here, with the same uniqueness checks.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(LOCAS_PEFT_TYPE)
    if registered is not None and registered.__qualname__ != config_cls.__qualname__:
        raise KeyError(f"PEFT type LOCAS is already registered to {registered.__module__}.{registered.__qualname__}.")
    owner = next(
        (t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == LOCAS_PREFIX and t != LOCAS_PEFT_TYPE), None
    )
    if owner is not None:
        raise KeyError(f"The prefix {LOCAS_PREFIX!r} is already used by PEFT type {owner.name}.")
    if getattr(model_cls, "prefix", LOCAS_PREFIX) != LOCAS_PREFIX:
        raise ValueError(f"{model_cls.__name__}.prefix must be {LOCAS_PREFIX!r}.")

    PEFT_TYPE_TO_PREFIX_MAPPING[LOCAS_PEFT_TYPE] = LOCAS_PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[LOCAS_PEFT_TYPE] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[LOCAS_PEFT_TYPE] = model_cls
