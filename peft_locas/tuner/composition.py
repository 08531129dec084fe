"""Composing Locas memories exactly: a memory is a set of MLP units, so concatenating the units of several memories
(each memory's value rows scaled by its weight) gives one memory whose output is the weighted sum of theirs, in every
block, before and after merging. This is PEFT's ``add_weighted_adapter(..., combination_type="cat")`` for Locas.

Other combination types of PEFT's LoRA API have no exact meaning for a memory: ``linear``/``ties``/``dare_*`` average
the *weights* of units that have nothing to do with each other (unit i of book A is not unit i of book B), and ``svd``
compresses the LoRA product. A composed two-layer-MLP (Locas-MLP) memory can then be compressed to a smaller width
with NL-SVD, `peft_locas.init.nlsvd.compress_locas_memory` (the method's section 3): an approximation, and so a
separate, explicit step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..weights.blocks import Units
from .config import LocasConfig
from .layer import LocasLayer

#: the combination types Locas memories support (PEFT's names)
COMBINATION_TYPES = ("cat",)


def add_weighted_adapter(
    tuner: object,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
) -> None:
    """Add ``adapter_name``: the memories ``adapters`` side by side, memory i's output scaled by ``weights[i]``.

    In every wrapped MLP block the new memory has ``sum(r_i)`` units: the inputs' gate/key rows as they are and their
    value rows times ``weights[i] * tau_i / tau``, where ``tau`` is the first input's output scale in that block, so
    ``tau * Mem(x) = sum_i weights[i] * tau_i * Mem_i(x)`` exactly (up to float rounding). The new adapter is not
    active and not trainable (as in PEFT); ``set_adapter(adapter_name)`` uses it, ``merge_and_unload`` bakes it in.

    Args:
        tuner: the `LocasModel` (``peft_model.base_model``; ``PeftModel.add_weighted_adapter`` forwards here).
        adapters: names of existing Locas adapters, which must wrap the same MLP blocks.
        weights: one float per adapter (1.0 each: the plain sum).
        adapter_name: the new adapter's name.
        combination_type: ``"cat"``, the only type with an exact meaning for memories (see the module docstring).

    Raises:
        ValueError: an unknown adapter (PEFT's "Adapter X does not exist"), an existing ``adapter_name``, another
            combination type (PEFT's "Invalid combination_type: X"), weights not one per adapter, or adapters over
            different blocks or of different MLP forms.
    """
    configs = tuner.peft_config
    for adapter in adapters:
        if adapter not in configs:
            raise ValueError(f"Adapter {adapter} does not exist")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)"
        )
    if adapter_name in configs:
        raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} already exists")
    inputs = [configs[adapter] for adapter in adapters]
    if not all(isinstance(config, LocasConfig) for config in inputs):
        kinds = sorted({type(config).__name__ for config in inputs})
        raise ValueError(f"add_weighted_adapter composes Locas adapters only, got {', '.join(kinds)}")
    layers = [module for module in tuner.model.modules() if isinstance(module, LocasLayer)]
    for layer in layers:
        present = [adapter for adapter in adapters if adapter in layer.locas_memory]
        if present and len(present) != len(adapters):
            missing = sorted(set(adapters) - set(present))
            raise ValueError(
                f"add_weighted_adapter: {', '.join(missing)} has no memory in a block where {present[0]} has one; "
                "cat composes memories over the same MLP blocks"
            )
    targets = inputs[0].target_modules
    if not isinstance(targets, str):
        targets = set().union(*(set(config.target_modules) for config in inputs))
    # "data": a placeholder of the right width (nothing cloned, so any total width is allowed), overwritten below
    config = dataclasses.replace(inputs[0], r=sum(c.r for c in inputs), init_weights="data", target_modules=targets)
    configs[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    with torch.no_grad():
        for layer in layers:
            if adapters[0] in layer.locas_memory:
                _compose_layer(layer, adapters, weights, adapter_name)


def _compose_layer(layer: LocasLayer, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    memories = [layer.locas_memory[adapter] for adapter in adapters]
    if len({memory.gate is None for memory in memories}) > 1:
        raise ValueError("add_weighted_adapter: the memories differ in form (GLU and two-layer MLP) in one block")
    tau = memories[0].tau.item()
    dtype = memories[0].key.dtype
    gate = None if memories[0].gate is None else torch.cat([m.gate.to(dtype) for m in memories])
    key = torch.cat([m.key.to(dtype) for m in memories])
    # units() scales value by its tau: rescale so that the new memory's tau (the first input's) restores each output
    value = torch.cat([m.units().value.to(dtype) * (weight / tau) for m, weight in zip(memories, weights, strict=True)])
    layer.set_memory(adapter_name, Units(gate, key, value), tau, dtype=dtype)
    layer.locas_memory[adapter_name].requires_grad_(False)
