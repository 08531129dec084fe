"""Make ``LOCAS`` a PEFT method: extend ``PeftType`` and fill PEFT's registries.

The enum member's *value* is what PEFT writes as ``"peft_type"`` into ``adapter_config.json``: ``"LOCAS"``, the bare
name, as every built-in method writes its own. Any process that imports PEFT in an environment where peft-locas is
installed finds it (see `peft_locas._hook`). Earlier versions wrote a longer value that carried an install hint
(`LEGACY_PEFT_TYPE_VALUES`); adapters saved with it still load, through an alias of that value.
"""

from __future__ import annotations

from peft.utils import PeftType

from ._enum import add_enum_member

LOCAS_PREFIX = "locas_"
LOCAS_PEFT_TYPE_VALUE = "LOCAS"
#: ``PeftType.LOCAS``: the PEFT type of every Locas adapter; its value is written as ``peft_type`` in adapter configs.
LOCAS_PEFT_TYPE = add_enum_member(PeftType, "LOCAS", LOCAS_PEFT_TYPE_VALUE)
#: ``peft_type`` values that earlier releases wrote into adapter configs; PEFT reads them as ``PeftType.LOCAS``.
LEGACY_PEFT_TYPE_VALUES = ("LOCAS (install peft-locas and `import peft_locas` to load this adapter)",)


def _legacy_key(value: str) -> PeftType:
    """A ``PeftType`` instance equal (and hashing equal) to the legacy string, so that PEFT's dictionary lookups with
    the raw ``peft_type`` of a saved config find it, while its ``name`` and ``value`` behave like a member's for code
    that iterates the registries. It is not a member: ``list(PeftType)`` does not show it."""
    key = str.__new__(PeftType, value)
    key._name_, key._value_ = "LOCAS", value
    return key


def register_locas(config_cls: type, model_cls: type) -> None:
    """Register the Locas config and tuner with PEFT (idempotent, so re-imports and reloads are harmless).

    ``peft.utils.register_peft_method`` cannot be used: it refuses a second registration, and it knows nothing of the
    legacy values. The same three registries are filled here, with the same uniqueness checks; each legacy value maps to
    ``PeftType.LOCAS`` (``PeftType(legacy) is PeftType.LOCAS``) and to the config class, which is all that loading an
    old adapter needs: the loaded config's own ``peft_type`` is ``PeftType.LOCAS`` again.
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
    for value in LEGACY_PEFT_TYPE_VALUES:
        PeftType._value2member_map_.setdefault(value, LOCAS_PEFT_TYPE)
        PEFT_TYPE_TO_CONFIG_MAPPING[_legacy_key(value)] = config_cls
