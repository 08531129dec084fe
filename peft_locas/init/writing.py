"""Replace or grow an adapter's memories after construction, keeping its config truthful so the adapter reloads.

Data-driven initialisers produce memories whose width differs from the one the adapter was built with: a gradient
memory has one slot per memorised token, and NL-SVD compresses it back. ``LocasConfig`` has a single ``r``, so every
rewrite here keeps all layers of an adapter equally wide, records that width as ``r`` and sets
``init_weights="data"``. Loading the saved adapter then builds a placeholder of exactly that width (no cloning limit),
which the saved weights overwrite.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel

from ..tuner.config import LocasConfig
from ..tuner.layer import LocasLayer
from ..weights.blocks import Units
from ..weights.memory import LocasMemory


def locas_config(peft_model: PeftModel, adapter_name: str) -> LocasConfig:
    """The ``LocasConfig`` of ``adapter_name``, or a one-line error saying what to pass instead."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"Expected a PeftModel with a Locas adapter, got a {type(peft_model).__name__}. "
            "Wrap the model first: `get_peft_model(model, LocasConfig(...))`."
        )
    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, LocasConfig):
        locas = sorted(name for name, c in peft_model.peft_config.items() if isinstance(c, LocasConfig))
        raise ValueError(f"{adapter_name!r} is not a Locas adapter of this model; its Locas adapters are {locas}.")
    return config


def locas_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LocasLayer]:
    """The layers holding a memory of ``adapter_name``, keyed by module name inside the base model.

    Those names are the same on every copy of the model (another dtype, a quantized copy), which is what lets a
    memory computed on one copy be applied to another. Merged layers are refused: their memory is inside the block.
    """
    locas_config(peft_model, adapter_name)
    layers = {
        name: module
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, LocasLayer) and adapter_name in module.locas_memory
    }
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"The Locas memory of {merged[0]!r} is merged into its MLP block; call `unmerge_adapter()` before "
            "initialising, growing or compressing memories."
        )
    return layers


def write_locas_memories(
    peft_model: PeftModel, memories: Mapping[str, tuple[Units, float]], adapter_name: str = "default"
) -> None:
    """Replace the memory of every layer of ``adapter_name`` by ``memories[name] = (units, tau)``, ``value`` unscaled.

    Everything is checked before anything changes. Each new memory keeps the dtype and trainability of the one it
    replaces (``LocasLayer.set_memory`` carries them over), its rows are clipped to the adapter's ``max_norm``, and the
    config records the new width. Create the optimiser afterwards: the memory parameters are new objects.
    """
    config = locas_config(peft_model, adapter_name)
    layers = locas_layers(peft_model, adapter_name)
    _check_names(layers, memories, adapter_name)
    widths = {units.key.shape[0] for units, _ in memories.values()}
    if len(widths) != 1:
        raise ValueError(
            f"Memories of one adapter must be equally wide (LocasConfig has a single `r`), got widths {sorted(widths)}."
        )
    for name, layer in layers.items():
        _check_shape(name, layer.locas_memory[adapter_name], memories[name][0])
    with torch.no_grad():
        for name, layer in layers.items():
            units, tau = memories[name]
            layer.set_memory(adapter_name, units, tau)
            if config.max_norm is not None:
                layer.locas_memory[adapter_name].clip_(config.max_norm)
    config.r = widths.pop()
    config.init_weights = "data"


def grow_locas_memory(peft_model: PeftModel, slots: Mapping[str, Units], adapter_name: str = "default") -> None:
    """Append ``slots[name]`` (``value`` unscaled) after each layer's existing memory units.

    Each memory keeps its ``tau``, so the existing units' outputs are unchanged and the new slots are scaled by the
    same ``tau``.
    """
    layers = locas_layers(peft_model, adapter_name)
    _check_names(layers, slots, adapter_name)
    memories = {}
    for name, layer in layers.items():
        memory = layer.locas_memory[adapter_name]
        new = slots[name]
        _check_shape(name, memory, new)
        old = (memory.gate, memory.key, memory.value)
        grown = Units(*(None if a is None else torch.cat([a.detach(), b.to(a)]) for a, b in zip(old, new, strict=True)))
        memories[name] = (grown, memory.tau.item())
    write_locas_memories(peft_model, memories, adapter_name)


def _check_names(layers: Mapping[str, LocasLayer], given: Mapping[str, object], adapter_name: str) -> None:
    if set(given) != set(layers):
        mismatch = sorted(set(layers) ^ set(given))[0]
        raise ValueError(
            f"The memories given do not match the Locas layers of adapter {adapter_name!r} (first mismatch: "
            f"{mismatch!r}); compute them on a copy of the same model with the same LocasConfig targets."
        )


def _check_shape(name: str, current: LocasMemory, new: Units) -> None:
    parts = (current.gate, current.key, current.value)
    if (current.gate is None) != (new.gate is None) or any(
        a.shape[1] != b.shape[1] for a, b in zip(parts, new, strict=True) if a is not None
    ):
        shape = ", ".join(f"{part} {tuple(t.shape)}" for part, t in new._asdict().items() if t is not None)
        raise ValueError(
            f"The memory given for {name!r} ({shape}) does not fit its layer (a {current.key.shape[1]}-dim "
            f"{'GLU' if current.gate is not None else 'two-layer-MLP'} memory); compute it on a copy of the same model."
        )
