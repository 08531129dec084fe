"""``LocasMemory``: the parameters and computation of one adapter's memory beside one MLP block."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Units
from .initialization import clip_rows_


class LocasMemory(nn.Module):
    """``r`` memory units: ``tau * V^T (act(G x) * (K x))`` (GLU) or ``tau * V^T act(K x)`` (two-layer MLP).

    Each row of ``gate`` (``G``), ``key`` (``K``) and ``value`` (``V``) belongs to one unit and is the unit of norm
    clipping. ``tau`` is a saved buffer, so an adapter reproduces its outputs on any copy of its base model (e.g. a
    quantized one, whose down-projection norms, and so its automatic ``tau``, differ slightly).
    """

    def __init__(self, memory: Units, tau: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()

        def parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
            if tensor is None:
                return None
            return nn.Parameter(tensor.detach().to(device=device, dtype=dtype).contiguous())

        self.gate = parameter(memory.gate)
        self.key = parameter(memory.key)
        self.value = parameter(memory.value)
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32, device=device))

    @property
    def width(self) -> int:
        """The number of memory units ``r``."""
        return self.key.shape[0]

    def forward(self, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hidden = F.linear(x, self.key)
        hidden = activation(F.linear(x, self.gate)) * hidden if self.gate is not None else activation(hidden)
        hidden = hidden * self.tau.to(hidden.dtype)  # scaling the r-wide hidden is cheaper than the output
        return hidden @ self.value

    def units(self) -> Units:
        """The memory as block units with ``value`` scaled by ``tau``: exactly what merging appends."""
        return Units(self.gate, self.key, self.value * self.tau.to(self.value.dtype))

    def clip_(self, max_norm: float) -> None:
        """Project each gate/key/value row onto the L2 ball of radius ``max_norm`` (in place)."""
        for rows in (self.gate, self.key, self.value):
            if rows is not None:
                clip_rows_(rows, max_norm)

    def extra_repr(self) -> str:
        kind = "glu" if self.gate is not None else "mlp"
        return f"variant={kind}, r={self.width}, d={self.key.shape[1]}, tau={self.tau.item():.4g}"
