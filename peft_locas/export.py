"""Turn a model whose MLP blocks gained memory units into a vanilla transformers checkpoint.

A transformers config has one intermediate size for all layers, but after merging, each block is as wide as its
base width plus the memory units merged into it. Blocks narrower than the widest one are padded with all-zero units
(zero gate/key rows and zero output vectors), which contribute exactly zero, and the config is updated.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .blocks import BlockKind, zero_units
from .projections import is_quantized, to_float_projection


def make_block_widths_uniform(model: nn.Module, blocks: Sequence[tuple[nn.Module, BlockKind]]) -> int:
    """Pad every block to the widest one with zero units, record that width in the config, and return it."""
    if not blocks:
        return 0
    widths = [kind.width(block) for block, kind in blocks]
    target = max(widths)
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
