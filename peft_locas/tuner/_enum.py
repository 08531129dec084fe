"""Add a member to an existing ``enum.Enum`` class after its creation.

PEFT keys its registries by the closed ``PeftType`` enum, so a method living outside PEFT has to extend it. The
standard library has no public API for that; this module does it through the attributes every CPython from 3.10 to
3.13 uses for lookups (``_member_map_``, ``_member_names_``, ``_value2member_map_``), so that iteration, ``Enum[name]``,
``Enum(value)``, ``in``, pickling and ``dataclasses.asdict`` all see the new member. It deliberately imports nothing
from the rest of the package, so it can be tested under several interpreters without torch.
"""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def add_enum_member(enum_cls: type[E], name: str, value: str) -> E:
    """Return ``enum_cls[name]``, creating it with ``value`` if it does not exist yet (idempotent).

    Raises ``ValueError`` if ``name`` exists with another value or ``value`` is taken by another member, since
    silently aliasing would make two methods share one registry key.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}.")
        return existing
    if value in enum_cls._value2member_map_:
        taken_by = enum_cls._value2member_map_[value].name
        raise ValueError(f"Value {value!r} is already used by {enum_cls.__name__}.{taken_by}.")

    base_type = enum_cls._member_type_
    member = base_type.__new__(enum_cls, value) if base_type is not object else object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_"):  # present on 3.11+, used by the repr of Flag-like enums
        member._sort_order_ = len(enum_cls._member_names_)

    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    hashable_values = getattr(enum_cls, "_hashable_values_", None)  # 3.13+: backs `value in enum_cls`
    if isinstance(hashable_values, list):
        hashable_values.append(value)
    # EnumType.__setattr__ refuses to rebind members; the class attribute is set at type level instead.
    type.__setattr__(enum_cls, name, member)
    return member
