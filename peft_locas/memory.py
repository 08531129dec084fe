"""``LocasMemory``: the parameters and computation of one adapter's memory beside one MLP block."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Units
from .initialization import clip_rows_
from .zero import clip_zero_rows_, is_zero_managed


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

    def stackable_with(self, other: LocasMemory) -> bool:
        """Whether the two memories can run as one batched matmul (`stacked_output`): same form, width and dtype."""
        return (
            (self.gate is None) == (other.gate is None)
            and self.key.shape == other.key.shape
            and self.value.shape == other.value.shape
            and self.key.dtype == other.key.dtype
        )

    def units(self) -> Units:
        """The memory as block units with ``value`` scaled by ``tau``: exactly what merging appends."""
        return Units(self.gate, self.key, self.value * self.tau.to(self.value.dtype))

    def clip_(self, max_norm: float) -> None:
        """Project each gate/key/value row onto the L2 ball of radius ``max_norm`` (in place); under DeepSpeed ZeRO,
        also the optimiser's master rows (`peft_locas.zero`), a collective operation."""
        for rows in (self.gate, self.key, self.value):
            if rows is not None and is_zero_managed(rows):
                clip_zero_rows_(rows, max_norm)
            elif rows is not None:
                clip_rows_(rows, max_norm)

    def extra_repr(self) -> str:
        kind = "glu" if self.gate is not None else "mlp"
        return f"variant={kind}, r={self.width}, d={self.key.shape[1]}, tau={self.tau.item():.4g}"


def stacked_output(
    memories: Sequence[LocasMemory], x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Row ``b`` of ``x`` (``(B, ..., d_in)``) through ``memories[b]``, as one batched matmul per projection.

    The memories' rows are stacked into ``(B, r, d)`` tensors (a copy of a few hundred KB per block, differentiable:
    each memory's gradient comes only from its own rows), so B memories cost one kernel per projection instead of B
    gathers, matmuls and scatters. The memories must be pairwise `LocasMemory.stackable_with`.

    Returns:
        ``(B, ..., d_out)`` in the memories' dtype: ``tau_b * Mem_b(x[b])`` per row.
    """
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
    key = torch.stack([m.key for m in memories])  # (B, r, d_in)
    hidden = torch.bmm(flat, key.transpose(1, 2))
    if memories[0].gate is not None:
        gate = torch.stack([m.gate for m in memories])
        hidden = activation(torch.bmm(flat, gate.transpose(1, 2))) * hidden
    else:
        hidden = activation(hidden)
    tau = torch.stack([m.tau for m in memories]).to(hidden.dtype).view(-1, 1, 1)
    output = torch.bmm(hidden * tau, torch.stack([m.value for m in memories]))
    return output.reshape(*x.shape[:-1], output.shape[-1])
