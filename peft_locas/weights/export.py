"""Turn a model whose MLP blocks gained memory units into a vanilla transformers checkpoint.

A transformers config has one intermediate size for all layers, but after merging, each block is as wide as its
base width plus the memory units merged into it. Blocks narrower than the widest one are padded with all-zero units
(zero gate/key rows and zero output vectors), which contribute exactly zero, and the config is updated. The same zero
units can round the common width up to a multiple of a quantizer's block (``pad_to_multiple_of``): llama.cpp's
k-quants need every row of ``ffn_down``, which is as long as the intermediate size, to be a whole number of 256-wide
blocks, and its other formats a whole number of 32-wide ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .blocks import BlockKind, zero_units
from .projections import is_quantized, to_float_projection


def check_pad_to_multiple_of(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` (no padding) or a positive ``int``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"pad_to_multiple_of must be a positive integer or None, got {value!r}: use 256 for a checkpoint that "
            "every GGUF format (k-quants included) quantizes, or None to keep the merged width."
        )


def padded_width(width: int, multiple_of: int) -> int:
    """``width`` rounded up to a multiple of ``multiple_of`` (>= 1)."""
    return -(-width // multiple_of) * multiple_of


def make_block_widths_uniform(
    model: nn.Module, blocks: Sequence[tuple[nn.Module, BlockKind]], multiple_of: int = 1
) -> int:
    """Pad every block with zero units to the widest one's width, rounded up to a multiple of ``multiple_of``, record
    that width in the config, and return it (0 without blocks).

    A zero unit adds exactly 0 to the block's output whatever its activation: its output vector is zero (GLU units
    also have zero gate and up rows; two-layer MLP units a zero input row and zero bias, so ``act(0)`` may be non-zero
    but is multiplied by the zero output vector). Growing a quantized block re-quantizes it, which can round its
    weights (bitsandbytes' double quantization does), so `LocasModel.merge_and_unload` pads to a multiple only
    full-precision blocks.
    """
    if not blocks:
        return 0
    widths = [kind.width(block) for block, kind in blocks]
    target = padded_width(max(widths), multiple_of)
    for (block, kind), width in zip(blocks, widths, strict=True):
        if width < target:
            kind.append_units(block, zero_units(kind.read_units(block), target - width))
    for config_key in {kind.width_config_key for _, kind in blocks}:
        _set_width_in_config(model, config_key, target)
    return target


def _set_width_in_config(model: nn.Module, key: str, width: int) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    candidates = [config]
    if hasattr(config, "get_text_config"):
        candidates.append(config.get_text_config())
    updated = False
    for candidate in {id(c): c for c in candidates}.values():
        if hasattr(candidate, key):
            setattr(candidate, key, width)
            updated = True
    if not updated:
        raise ValueError(
            f"The merged MLP blocks are {width} units wide, but {type(config).__name__} has no `{key}` to record it; "
            "the merged model would not reload with this config. Keep the adapter unmerged or save the state dict."
        )


def dequantize_base_model(model: nn.Module) -> None:
    """Replace every quantized layer of ``model`` by a float layer holding its dequantized weight, in place, and
    drop the quantization config, so that merging is exact and the result saves as a plain float checkpoint.

    Not transformers' ``dequantize()``: that reads bitsandbytes 4-bit weights wrongly once bitsandbytes has repacked
    them for its CPU kernel (after the first inference forward on CPUs with AVX512-BF16); ``read_projection`` undoes
    the packing first. Layers are cast to ``config.dtype`` when the model records one, as transformers does.
    """
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            model.set_submodule(name, to_float_projection(module, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
