"""Unit statistics for ``"top_k"`` / ``"bottom_k"``: how strongly the context activates each base unit."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..tuner.layer import LocasLayer
from ..weights.offload import execution_device
from .stream import Stream


def unit_activity(stream: Stream, layers: Mapping[str, LocasLayer]) -> dict[str, torch.Tensor]:
    """Mean ``|M_j|`` of every base unit over the counted tokens, ``M`` being the input of the block's output
    projection (``act(W_gate A) * (W_up A)``, or ``act(W_in A)``), exactly as the backbone computes it."""
    # every BlockKind lists its output projection last
    projections = {name: layer.block_kind.output_projection(layer.get_base_layer()) for name, layer in layers.items()}
    sums = {
        name: torch.zeros(layer.block_kind.width(layer.get_base_layer()), device=execution_device(projections[name]))
        for name, layer in layers.items()
    }

    def update(name: str, rows: torch.Tensor) -> None:
        sums[name] += rows.float().abs().sum(dim=0)

    count = torch.tensor(float(stream.accumulate(projections, update)), device=stream.device)
    stream.ranks.sum_([count, *sums.values()])
    return {name: total / count.item() for name, total in sums.items()}
