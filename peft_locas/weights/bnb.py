"""bitsandbytes 4-bit (NF4/FP4) and 8-bit projections: dequantize to read, re-quantize with the same settings to
rewrite, and restore the original quantized weights exactly on unmerge.

Importing this module registers the implementations with `peft_locas.weights.projections`; the package does so when
bitsandbytes is installed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from .projections import (
    ProjectionWeights,
    is_quantized,
    protect_layout_,
    read_projection,
    snapshot_projection,
    unit_granularity,
    write_projection,
)


def _dequantize_4bit(layer: Linear4bit) -> torch.Tensor:
    weight = layer.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpack_for_cpu(data, state)
    return bnb.functional.dequantize_4bit(data, state)


def _unpack_for_cpu(data: torch.Tensor, state: bnb.functional.QuantState):
    """Undo bitsandbytes' repacking of a 4-bit weight for its CPU kernel, without touching the layer.

    bitsandbytes repacks weights in place on the first inference forward on CPUs with AVX512-BF16. Its inverse
    rewrites the state it is given (so it gets a copy here) and, for states without double quantization, leaves
    ``absmax`` in the kernel's transposed ``(blocks per row, rows)`` layout, which is put back in row order here.
    """
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    if state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def _unpack_before_saving(layer: Linear4bit, prefix: str, keep_vars: bool) -> None:
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _unpack_for_cpu(weight.data, weight.quant_state)


@protect_layout_.register
def _(layer: Linear4bit) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first inference forward, and its
    ``state_dict()`` undoes that in place with the bug `_unpack_for_cpu` corrects, leaving a corrupt base (logits off by
    tens on SmolLM2). A state-dict pre-hook unpacks the weight correctly first; the kernel repacks it on its next
    forward, so the layer keeps its fast path and its exact results."""
    if not getattr(layer, "_locas_unpacks_before_saving", False):
        layer.register_state_dict_pre_hook(_unpack_before_saving)
        layer._locas_unpacks_before_saving = True


@read_projection.register
def _(layer: Linear4bit) -> ProjectionWeights:
    return ProjectionWeights(_dequantize_4bit(layer), layer.bias)


@write_projection.register
def _(layer: Linear4bit, weights: ProjectionWeights) -> None:
    old = layer.weight
    new = bnb.nn.Params4bit(
        weights.weight.detach().to("cpu").contiguous(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=layer,
    )
    layer.weight = new.to(old.device)  # moving an unquantized Params4bit to a device quantizes it
    _write_bias(layer, weights.bias)
    layer.out_features, layer.in_features = weights.weight.shape


@read_projection.register
def _(layer: Linear8bitLt) -> ProjectionWeights:
    weight = layer.weight
    scale = weight.SCB if weight.SCB is not None else layer.state.SCB  # bnb moves it to the state after a forward
    return ProjectionWeights(bnb.functional.int8_vectorwise_dequant(weight.data, scale), layer.bias)


@write_projection.register
def _(layer: Linear8bitLt, weights: ProjectionWeights) -> None:
    old = layer.weight
    new = bnb.nn.Int8Params(
        weights.weight.detach().to("cpu").contiguous(), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    )
    layer.weight = new.to(old.device)  # moving an unquantized Int8Params from the CPU quantizes it
    layer.state = copy.copy(layer.state)  # a fresh state; the old one stays with the old weight for restoring
    layer.state.reset_grads()
    _write_bias(layer, weights.bias)
    layer.out_features, layer.in_features = weights.weight.shape


def _write_bias(layer: torch.nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(layer.bias), requires_grad=layer.bias.requires_grad)


@is_quantized.register(Linear4bit)
@is_quantized.register(Linear8bitLt)
def _(layer: torch.nn.Module) -> bool:
    return True


@unit_granularity.register
def _(layer: Linear4bit) -> int:
    # whole quantization blocks, and bitsandbytes' CPU kernel packs output rows in groups of 32
    return math.lcm(layer.weight.blocksize, 32)


@snapshot_projection.register(Linear4bit)
@snapshot_projection.register(Linear8bitLt)
def _(layer: torch.nn.Module) -> Callable[[], None]:
    # 4-bit layers keep a module-level copy of the weight's quant_state, 8-bit ones a matmul state
    names = ("weight", "bias", "out_features", "in_features", "quant_state", "state")
    saved = {name: getattr(layer, name) for name in names if hasattr(layer, name)}

    def restore() -> None:
        for name, value in saved.items():
            setattr(layer, name, value)

    return restore
