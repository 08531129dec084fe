"""Read and rewrite the weights of a projection layer in one orientation, whatever its type.

Merging a memory appends *units* (output rows of the input projections, input columns of the output projection).
Layer types store their weights differently (``nn.Linear`` as ``(out, in)``, GPT-2's ``Conv1D`` as ``(in, out)``,
quantized layers packed); every block-level operation goes through these two functions, and a new layer type is
supported by registering one implementation of each, not by branching in the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import singledispatch
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .offload import is_offloaded, onloaded


class ProjectionWeights(NamedTuple):
    """A projection's parameters in ``nn.Linear`` orientation: ``weight`` is ``(out_features, in_features)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@singledispatch
def read_projection(layer: nn.Module) -> ProjectionWeights:
    """Return the layer's weight ``(out, in)`` and bias as float tensors (dequantized where needed).

    For unquantized layers these are the parameters themselves (views, not copies): callers must not modify them.
    """
    raise TypeError(
        f"Locas cannot read the weights of a {type(layer).__name__} projection; supported: nn.Linear, "
        "transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt."
    )


@singledispatch
def write_projection(layer: nn.Module, weights: ProjectionWeights) -> None:
    """Replace the layer's weight (and bias) by ``weights`` (``(out, in)`` orientation), resizing the layer."""
    raise TypeError(
        f"Locas cannot rewrite the weights of a {type(layer).__name__} projection, so it cannot merge into it. "
        "Export a full-precision checkpoint instead: `merge_and_unload(dequantize=True)`."
    )


@singledispatch
def is_quantized(layer: nn.Module) -> bool:
    """Whether rewriting the layer rounds its weights (then merging is lossy and unmerging restores a snapshot)."""
    return False


@singledispatch
def unit_granularity(layer: nn.Module) -> int:
    """Merged widths should be a multiple of this, so appended units occupy whole quantization blocks of their own
    and leave the original blocks (and so the original weights) unchanged."""
    return 1


@singledispatch
def snapshot_projection(layer: nn.Module) -> Callable[[], None]:
    """A function that puts the layer's current parameters back exactly (it keeps references to them)."""
    weight, bias = layer.weight, layer.bias
    out_features, in_features = projection_size(layer)

    def restore() -> None:
        layer.weight, layer.bias = weight, bias
        _set_features(layer, out_features, in_features)

    return restore


@singledispatch
def protect_layout_(layer: nn.Module) -> None:
    """Make ``layer.state_dict()`` safe to call. A no-op except for layers whose kernels repack weights behind their
    owners' backs and whose ``state_dict()`` undoes that wrongly (bitsandbytes 4-bit on CPU); applied to every module
    of a model Locas wraps, as PEFT saves and loads adapters through ``state_dict()``."""


def projection_size(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` without reading (or dequantizing) the weights; Conv1D calls them nf/nx. A
    registered layer type without size attributes is measured by `read_projection` (``(out, in)`` weights)."""
    if hasattr(layer, "nf"):
        return layer.nf, layer.nx
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return layer.out_features, layer.in_features
    out_features, in_features = read_projection(layer).weight.shape
    return out_features, in_features


def can_rewrite(layer: nn.Module) -> bool:
    """Whether `write_projection` supports this layer type (so merging into it is possible)."""
    return write_projection.dispatch(type(layer)) is not write_projection.dispatch(object)


def _read(layer: nn.Module, weight: Callable[[nn.Module], torch.Tensor]) -> ProjectionWeights:
    """``weight(layer)`` (the ``(out, in)`` view of its weight) and its bias; an offloaded layer's are loaded back as
    accelerate's hook does and copied before it puts them away again."""
    if is_offloaded(layer):
        with onloaded(layer):
            return ProjectionWeights(weight(layer).clone(), None if layer.bias is None else layer.bias.clone())
    return ProjectionWeights(weight(layer), layer.bias)


@read_projection.register
def _(layer: nn.Linear) -> ProjectionWeights:
    return _read(layer, lambda linear: linear.weight)


@write_projection.register
def _(layer: nn.Linear, weights: ProjectionWeights) -> None:
    layer.weight = _like(layer.weight, weights.weight)
    if weights.bias is not None:
        layer.bias = _like(layer.bias, weights.bias)
    _set_features(layer, *weights.weight.shape)


@read_projection.register
def _(layer: Conv1D) -> ProjectionWeights:
    return _read(layer, lambda conv: conv.weight.T)  # Conv1D stores (in, out)


@write_projection.register
def _(layer: Conv1D, weights: ProjectionWeights) -> None:
    layer.weight = _like(layer.weight, weights.weight.T.contiguous())
    if weights.bias is not None:
        layer.bias = _like(layer.bias, weights.bias)
    _set_features(layer, *weights.weight.shape)


def _set_features(layer: nn.Module, out_features: int, in_features: int) -> None:
    """Keep the layer's size attributes truthful (``nf``/``nx`` are GPT-2 Conv1D's names for them)."""
    sizes = {"out_features": out_features, "in_features": in_features, "nf": out_features, "nx": in_features}
    for name, value in sizes.items():
        if hasattr(layer, name):
            setattr(layer, name, value)


def _like(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``new`` with the dtype, device and ``requires_grad`` of ``old``."""
    return nn.Parameter(new.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)


def append_output_units(layer: nn.Module, rows: torch.Tensor) -> None:
    """Append output units with the given weight rows ``(n, in)`` and zero bias."""
    weights = read_projection(layer)
    bias = None if weights.bias is None else torch.cat([weights.bias, weights.bias.new_zeros(rows.shape[0])])
    write_projection(layer, ProjectionWeights(torch.cat([weights.weight, rows.to(weights.weight)], dim=0), bias))


def append_input_units(layer: nn.Module, columns: torch.Tensor) -> None:
    """Append input units with the given weight columns ``(out, n)``; the bias is unchanged."""
    weights = read_projection(layer)
    write_projection(
        layer, ProjectionWeights(torch.cat([weights.weight, columns.to(weights.weight)], dim=1), weights.bias)
    )


def keep_output_units(layer: nn.Module, index: torch.Tensor | slice) -> None:
    """Keep only the output units selected by ``index`` (used to drop appended units on unmerge)."""
    weights = read_projection(layer)
    bias = None if weights.bias is None else weights.bias[index]
    write_projection(layer, ProjectionWeights(weights.weight[index], bias))


def keep_input_units(layer: nn.Module, index: torch.Tensor | slice) -> None:
    """Keep only the input units selected by ``index``."""
    weights = read_projection(layer)
    write_projection(layer, ProjectionWeights(weights.weight[:, index], weights.bias))


def to_float_projection(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain float layer computing what ``layer`` computes, in ``dtype``: an ``nn.Linear``, or a ``Conv1D`` where
    transformers quantized one (it records the original class as ``source_cls``), so the model reloads as it was."""
    weights = read_projection(layer)
    dtype = dtype or weights.weight.dtype
    weight = weights.weight.detach().to(dtype)
    bias = None if weights.bias is None else nn.Parameter(weights.bias.detach().to(dtype), requires_grad=False)
    out_features, in_features = weight.shape
    if issubclass(getattr(layer, "source_cls", nn.Linear), Conv1D):
        projection = Conv1D(out_features, in_features)
        projection.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        projection.bias = (
            bias if bias is not None else nn.Parameter(weight.new_zeros(out_features), requires_grad=False)
        )
        return projection
    projection = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    projection.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        projection.bias = bias
    return projection
