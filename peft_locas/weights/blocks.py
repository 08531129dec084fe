"""MLP block structures Locas can wrap, recognised by their children rather than by model type.

A transformer MLP is a sum over independent intermediate *units*: unit ``j`` reads the input through its gate/up rows
(GLU) or its ``fc_in`` row (two-layer MLP) and writes its output vector (column ``j`` of the down projection). A
Locas memory is ``r`` more such units, so every family reduces to three operations: read the units, append units,
drop the last units. Each `BlockKind` implements them for one layout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn

from .offload import is_offloaded
from .projections import (
    append_input_units,
    append_output_units,
    can_rewrite,
    is_quantized,
    keep_input_units,
    keep_output_units,
    projection_size,
    read_projection,
    snapshot_projection,
    unit_granularity,
)

Variant = Literal["glu", "mlp"]


class Units(NamedTuple):
    """Weights of ``n`` intermediate units, each row one unit: ``gate``/``key`` ``(n, d_in)``, ``value`` ``(n, d_out)``.

    ``key`` is the up-projection row of a GLU unit, or the ``fc_in`` row of a two-layer MLP unit; ``value`` is the
    unit's output vector (a column of the down projection, stored as a row). ``gate`` is ``None`` for two-layer MLPs.
    """

    gate: torch.Tensor | None
    key: torch.Tensor
    value: torch.Tensor


def zero_units(like: Units, count: int) -> Units:
    """``count`` all-zero units shaped like ``like``: they contribute exactly zero to a block's output."""
    return Units(*(None if t is None else t.new_zeros(count, t.shape[1]) for t in like))


def units_output(units: Units, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The summed output of ``units`` for inputs ``x``, computed in ``x``'s dtype from the weights as read (biases left
    out: merging never touches them). Applied to a block's `BlockKind.read_units`, it recomputes the block without its
    kernels, e.g. in fp32 over a quantized block, to measure exactly what a merge changed."""
    key = x @ units.key.to(x.dtype).T
    hidden = activation(x @ units.gate.to(x.dtype).T) * key if units.gate is not None else activation(key)
    return hidden @ units.value.to(x.dtype)


def is_projection(module: object) -> bool:
    """Whether ``module`` is a layer whose weights `peft_locas.weights.projections` can read."""
    return isinstance(module, nn.Module) and read_projection.dispatch(type(module)) is not read_projection.dispatch(
        object
    )


class BlockKind(ABC):
    """One MLP layout: how to recognise it, read its units, and append or drop units."""

    variant: Variant
    #: attribute of the model config holding the intermediate size of this layout
    width_config_key: str

    @abstractmethod
    def matches(self, block: nn.Module) -> bool: ...

    @abstractmethod
    def activation(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]: ...

    @abstractmethod
    def read_units(self, block: nn.Module) -> Units: ...

    @abstractmethod
    def _append_units(self, block: nn.Module, units: Units) -> None: ...

    @abstractmethod
    def _keep_first_units(self, block: nn.Module, count: int) -> None: ...

    def append_units(self, block: nn.Module, units: Units) -> None:
        """Append ``units`` after the existing ones (in place, under ``no_grad``)."""
        with torch.no_grad():
            self._append_units(block, units)
        _sync_width_attribute(block, self.width(block))

    def keep_first_units(self, block: nn.Module, count: int) -> None:
        """Drop every unit after the first ``count`` (in place)."""
        with torch.no_grad():
            self._keep_first_units(block, count)
        _sync_width_attribute(block, count)

    @abstractmethod
    def projections(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """The block's projections, the output projection last."""

    def output_projection(self, block: nn.Module) -> nn.Module:
        """The projection that reads the units' activations and writes the block's output (down_proj, fc_out)."""
        return self.projections(block)[-1]

    @abstractmethod
    def width(self, block: nn.Module) -> int:
        """The number of units, read from the layer sizes (cheap even for quantized blocks)."""

    def is_quantized(self, block: nn.Module) -> bool:
        return any(is_quantized(p) for p in self.projections(block))

    def unit_granularity(self, block: nn.Module) -> int:
        return math.lcm(*(unit_granularity(p) for p in self.projections(block)))

    def units_for_merge(self, block: nn.Module, units: Units) -> Units:
        """``units`` as they should be appended to ``block``; for quantized blocks, prepared so rounding costs least.

        Padding with zero units makes the appended units fill whole quantization blocks of their own. GLU units are
        also *balanced*: ``act(g.x) * (k.x) * v`` is unchanged by ``k / s``, ``v * s``, and choosing ``s`` per unit
        so that ``v`` reaches (but never raises) the down projection's per-row magnitude lets row-wise quantizers
        (8-bit) spend their levels on the memory instead of rounding its small output vectors to a few steps.
        """
        if units.gate is not None and self.is_quantized(block):
            row_scale = self.read_units(block).value.abs().amax(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
            stretch = (units.value.abs() / row_scale.to(units.value)).amax(dim=1, keepdim=True)
            s = torch.where(stretch > 0, 1 / stretch, torch.ones_like(stretch))
            units = Units(units.gate, units.key / s, units.value * s)
        padding = -(self.width(block) + units.key.shape[0]) % self.unit_granularity(block)
        if padding:
            units = Units(
                *(
                    None if a is None else torch.cat([a, z])
                    for a, z in zip(units, zero_units(units, padding), strict=True)
                )
            )
        return units

    def check_mergeable(self, block: nn.Module) -> None:
        """Raise, before anything changes, if a projection of ``block`` cannot be rewritten (quantized by a library
        this package cannot re-quantize with, or offloaded by accelerate)."""
        if any(is_offloaded(p) for p in self.projections(block)):
            raise ValueError(
                "Cannot merge a Locas memory into an offloaded MLP block (device_map 'cpu'/'disk'): its weights are "
                "not in memory to be rewritten. Load the base model without offloading to merge, or keep the adapter "
                "unmerged."
            )
        for projection in self.projections(block):
            if not can_rewrite(projection):
                raise TypeError(
                    f"Cannot merge a Locas memory into {type(projection).__name__} layers: this package cannot "
                    "re-quantize them. Export a full-precision checkpoint instead with "
                    "`merge_and_unload(dequantize=True)`, or keep the adapter unmerged."
                )

    def snapshot(self, block: nn.Module) -> Callable[[], None] | None:
        """A function restoring the block's current weights exactly, for quantized blocks, where re-quantizing after
        dropping units would round; ``None`` for unquantized ones, where dropping units is exact and free."""
        if not self.is_quantized(block):
            return None
        restorers = [snapshot_projection(p) for p in self.projections(block)]

        def restore() -> None:
            for restorer in restorers:
                restorer()
            _sync_width_attribute(block, self.width(block))

        return restore

    def describe(self) -> str:
        return f"{type(self).__name__}({self.variant})"


class SplitGlu(BlockKind):
    """``down(act(gate(x)) * up(x))`` with separate ``gate_proj``/``up_proj``/``down_proj`` (Llama, Mistral, Qwen2/3,
    Gemma 1/2/3)."""

    variant: Variant = "glu"
    width_config_key = "intermediate_size"

    def matches(self, block: nn.Module) -> bool:
        names = ("gate_proj", "up_proj", "down_proj")
        return all(is_projection(getattr(block, n, None)) for n in names) and callable(getattr(block, "act_fn", None))

    def activation(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return block.act_fn

    def projections(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return block.gate_proj, block.up_proj, block.down_proj

    def width(self, block: nn.Module) -> int:
        return projection_size(block.up_proj)[0]

    def read_units(self, block: nn.Module) -> Units:
        return Units(
            read_projection(block.gate_proj).weight,
            read_projection(block.up_proj).weight,
            read_projection(block.down_proj).weight.T,
        )

    def _append_units(self, block: nn.Module, units: Units) -> None:
        append_output_units(block.gate_proj, units.gate)
        append_output_units(block.up_proj, units.key)
        append_input_units(block.down_proj, units.value.T)

    def _keep_first_units(self, block: nn.Module, count: int) -> None:
        keep_output_units(block.gate_proj, slice(0, count))
        keep_output_units(block.up_proj, slice(0, count))
        keep_input_units(block.down_proj, slice(0, count))


class FusedGlu(BlockKind):
    """``down(up * act(gate))`` with one fused ``gate_up_proj`` whose first half is the gate (Phi-3)."""

    variant: Variant = "glu"
    width_config_key = "intermediate_size"

    def matches(self, block: nn.Module) -> bool:
        return (
            is_projection(getattr(block, "gate_up_proj", None))
            and is_projection(getattr(block, "down_proj", None))
            and callable(getattr(block, "activation_fn", None))
        )

    def activation(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return block.activation_fn

    def projections(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return block.gate_up_proj, block.down_proj

    def width(self, block: nn.Module) -> int:
        return projection_size(block.gate_up_proj)[0] // 2

    def read_units(self, block: nn.Module) -> Units:
        gate, up = read_projection(block.gate_up_proj).weight.chunk(2, dim=0)
        return Units(gate, up, read_projection(block.down_proj).weight.T)

    def _append_units(self, block: nn.Module, units: Units) -> None:
        width = self.width(block)
        # rebuild as [gate; new gate; up; new up] so that chunk(2) still splits gate from up
        append_output_units(block.gate_up_proj, torch.cat([units.gate, units.key]))
        new = units.key.shape[0]
        order = torch.cat(
            [
                torch.arange(width),
                torch.arange(2 * width, 2 * width + new),
                torch.arange(width, 2 * width),
                torch.arange(2 * width + new, 2 * width + 2 * new),
            ]
        )
        keep_output_units(block.gate_up_proj, order)
        append_input_units(block.down_proj, units.value.T)

    def _keep_first_units(self, block: nn.Module, count: int) -> None:
        width = self.width(block)
        keep_output_units(block.gate_up_proj, torch.cat([torch.arange(count), torch.arange(width, width + count)]))
        keep_input_units(block.down_proj, slice(0, count))


class TwoLayerMlp(BlockKind):
    """A two-layer MLP ``fc_out(act(fc_in(x)))``.

    GPT-2 names its projections ``c_fc``/``c_proj`` (Conv1D), GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``.
    """

    variant: Variant = "mlp"

    def __init__(self, fc_in: str, fc_out: str, act: str, width_config_key: str) -> None:
        self.fc_in, self.fc_out, self.act = fc_in, fc_out, act
        self.width_config_key = width_config_key

    def matches(self, block: nn.Module) -> bool:
        return (
            is_projection(getattr(block, self.fc_in, None))
            and is_projection(getattr(block, self.fc_out, None))
            and callable(getattr(block, self.act, None))
        )

    def activation(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(block, self.act)

    def projections(self, block: nn.Module) -> tuple[nn.Module, ...]:
        return getattr(block, self.fc_in), getattr(block, self.fc_out)

    def width(self, block: nn.Module) -> int:
        return projection_size(getattr(block, self.fc_in))[0]

    def read_units(self, block: nn.Module) -> Units:
        fc_in = read_projection(getattr(block, self.fc_in)).weight
        return Units(None, fc_in, read_projection(getattr(block, self.fc_out)).weight.T)

    def _append_units(self, block: nn.Module, units: Units) -> None:
        append_output_units(getattr(block, self.fc_in), units.key)
        append_input_units(getattr(block, self.fc_out), units.value.T)

    def _keep_first_units(self, block: nn.Module, count: int) -> None:
        keep_output_units(getattr(block, self.fc_in), slice(0, count))
        keep_input_units(getattr(block, self.fc_out), slice(0, count))

    def describe(self) -> str:
        return f"TwoLayerMlp({self.fc_in}->{self.act}->{self.fc_out})"


BLOCK_KINDS: tuple[BlockKind, ...] = (
    SplitGlu(),
    FusedGlu(),
    TwoLayerMlp("c_fc", "c_proj", "act", width_config_key="n_inner"),
    TwoLayerMlp("dense_h_to_4h", "dense_4h_to_h", "act", width_config_key="intermediate_size"),
)


def find_block_kind(module: nn.Module) -> BlockKind | None:
    """The layout of ``module`` if it is an MLP block Locas can wrap, else ``None``."""
    return next((kind for kind in BLOCK_KINDS if kind.matches(module)), None)


def supported_layouts() -> str:
    """A one-line list of the recognised layouts, for error messages."""
    return ", ".join(kind.describe() for kind in BLOCK_KINDS)


def _sync_width_attribute(block: nn.Module, width: int) -> None:
    # HF GLU blocks record their width; keep it truthful after appending or dropping units
    if isinstance(getattr(block, "intermediate_size", None), int):
        block.intermediate_size = width
