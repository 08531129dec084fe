"""Activation keys (``"activation_keys"``): a memory whose keys are the leading directions of the context's
normalised MLP inputs (the NL-SVD probes of one activation key per token)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..tuner.layer import LocasLayer
from ..weights.blocks import Units
from .nlsvd import principal_keys
from .stream import Stream
from .units import normalize_rows


def activation_key_memories(
    stream: Stream, layers: Mapping[str, LocasLayer], adapter_name: str, r: int
) -> dict[str, Units]:
    """Keys (and GLU gates) the ``r`` leading eigenvectors of ``sum_t a_t a_t^T`` over the normalised MLP inputs
    ``a_t``; value 0."""
    current = {name: layer.locas_memory[adapter_name] for name, layer in layers.items()}
    scatters = {
        name: m.key.new_zeros(m.key.shape[1], m.key.shape[1], dtype=torch.float32) for name, m in current.items()
    }
    sums = {name: m.key.new_zeros(m.key.shape[1], dtype=torch.float32) for name, m in current.items()}

    def update(name: str, rows: torch.Tensor) -> None:
        rows = normalize_rows(rows.float())
        scatters[name] += rows.T @ rows
        sums[name] += rows.sum(dim=0)

    stream.accumulate(layers, update)
    stream.ranks.sum_([*scatters.values(), *sums.values()])
    memories = {}
    for name, memory in current.items():
        keys = principal_keys(scatters[name], sums[name], r).float()
        value = keys.new_zeros(r, memory.value.shape[1])
        memories[name] = Units(None if memory.gate is None else keys, keys, value)
    return memories
