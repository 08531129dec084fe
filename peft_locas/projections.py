"""Read and rewrite the weights of a projection layer in one orientation, whatever its type.

Merging a memory appends *units* (output rows of the input projections, input columns of the output projection).
Layer types store their weights differently (``nn.Linear`` as ``(out, in)``, GPT-2's ``Conv1D`` as ``(in, out)``,
quantized layers packed); every block-level operation goes through these two functions, and a new layer type is
supported by registering one implementation of each, not by branching in the callers.
"""

from __future__ import annotations

from functools import singledispatch
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class ProjectionWeights(NamedTuple):
    """A projection's parameters in ``nn.Linear`` orientation: ``weight`` is ``(out_features, in_features)``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


@singledispatch
def read_projection(layer: nn.Module) -> ProjectionWeights:
    """Return the layer's weight ``(out, in)`` and bias as float tensors (dequantized where needed)."""
    raise TypeError(
        f"Locas cannot read the weights of a {type(layer).__name__} projection; supported: nn.Linear, "
        "transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt."
    )


@singledispatch
def write_projection(layer: nn.Module, weights: ProjectionWeights) -> None:
    """Replace the layer's weight (and bias) by ``weights`` (``(out, in)`` orientation), resizing the layer."""
    raise TypeError(f"Locas cannot rewrite the weights of a {type(layer).__name__} projection.")


@read_projection.register
def _(layer: nn.Linear) -> ProjectionWeights:
    return ProjectionWeights(layer.weight, layer.bias)


@write_projection.register
def _(layer: nn.Linear, weights: ProjectionWeights) -> None:
    layer.weight = _like(layer.weight, weights.weight)
    if weights.bias is not None:
        layer.bias = _like(layer.bias, weights.bias)
    layer.out_features, layer.in_features = weights.weight.shape


@read_projection.register
def _(layer: Conv1D) -> ProjectionWeights:
    return ProjectionWeights(layer.weight.T, layer.bias)


@write_projection.register
def _(layer: Conv1D, weights: ProjectionWeights) -> None:
    layer.weight = _like(layer.weight, weights.weight.T.contiguous())
    if weights.bias is not None:
        layer.bias = _like(layer.bias, weights.bias)
    layer.nf = weights.weight.shape[0]


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
