"""``LocasMemory``: the parameters and computation of one adapter's memory beside one MLP block."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..init.units import clip_rows_
from .blocks import Units
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

    def forward(
        self,
        x: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor],
        add_to: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tau * Mem(x)`` for ``x`` of shape ``(..., d_in)`` in the memory's dtype, shape ``(..., d_out)``.

        With ``add_to`` (shape ``(..., d_out)``, e.g. the block's output), returns ``add_to + tau * Mem(x)`` in
        ``add_to``'s dtype; when the dtypes agree the sum is one fused ``addmm`` rather than a product and an addition
        (not in place: autograd may hold ``add_to``).

        GLU memories read their gate and key rows with one matmul over the concatenated ``(2r, d_in)`` rows: one
        kernel instead of two, which matters because ``r`` is small next to ``d_in``. The rows are concatenated at
        every call (a copy of ``2r x d_in``, small next to the product for more than a few tokens) rather than cached,
        since a cache could not see edits made through ``.data``, which bump no version counter.
        """
        if self.gate is not None:
            gate, key = F.linear(x, torch.cat((self.gate, self.key))).split(self.width, dim=-1)
            hidden = activation(gate) * key
        else:
            hidden = activation(F.linear(x, self.key))
        hidden = hidden * self.tau.to(hidden.dtype)  # scaling the r-wide hidden is cheaper than the output
        if add_to is None:
            return hidden @ self.value
        if add_to.dtype != hidden.dtype:
            return add_to + (hidden @ self.value).to(add_to.dtype)
        flat = torch.addmm(add_to.reshape(-1, add_to.shape[-1]), hidden.reshape(-1, self.width), self.value)
        return flat.view(add_to.shape)

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
        also the optimiser's master rows (`peft_locas.weights.zero`), a collective operation."""
        for rows in (self.gate, self.key, self.value):
            if rows is not None and is_zero_managed(rows):
                clip_zero_rows_(rows, max_norm)
            elif rows is not None:
                clip_rows_(rows, max_norm)

    def extra_repr(self) -> str:
        kind = "glu" if self.gate is not None else "mlp"
        return f"variant={kind}, r={self.width}, d={self.key.shape[1]}, tau={self.tau.item():.4g}"


def stacked_output(
    memories: Sequence[LocasMemory],
    x: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row ``b`` of ``x`` (``(B, ..., d_in)``) through ``memories[b]``, as one batched matmul per projection.

    The memories' rows are stacked into ``(B, r, d)`` tensors (a copy of a few hundred KB per block, differentiable:
    each memory's gradient comes only from its own rows), so B memories cost one kernel per projection instead of B
    gathers, matmuls and scatters. The memories must be pairwise `LocasMemory.stackable_with`.

    Returns:
        ``(B, ..., d_out)`` in the memories' dtype: ``tau_b * Mem_b(x[b])`` per row; with ``add_to`` (same shape),
        ``add_to`` plus that, in ``add_to``'s dtype (one fused ``baddbmm`` when the dtypes agree).
    """
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
    if memories[0].gate is not None:  # gate and key rows in one product, as in `LocasMemory.forward`
        rows = torch.stack([torch.cat((m.gate, m.key)) for m in memories])  # (B, 2r, d_in)
        gate, key = torch.bmm(flat, rows.transpose(1, 2)).split(memories[0].width, dim=-1)
        hidden = activation(gate) * key
    else:
        hidden = activation(torch.bmm(flat, torch.stack([m.key for m in memories]).transpose(1, 2)))
    tau = torch.stack([m.tau for m in memories]).to(hidden.dtype).view(-1, 1, 1)
    value = torch.stack([m.value for m in memories])  # (B, r, d_out)
    if add_to is None:
        output = torch.bmm(hidden * tau, value)
    elif add_to.dtype != hidden.dtype:
        output = add_to.reshape(*flat.shape[:2], -1) + torch.bmm(hidden * tau, value).to(add_to.dtype)
    else:
        output = torch.baddbmm(add_to.reshape(*flat.shape[:2], -1), hidden * tau, value)
    return output.reshape(*x.shape[:-1], output.shape[-1])
