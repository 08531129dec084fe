"""Turn a model whose MLP blocks gained memory units into a vanilla transformers checkpoint.

A transformers config has one intermediate size for all layers, but after merging, each block is as wide as its
base width plus the memory units merged into it. Blocks narrower than the widest one are padded with all-zero units
(zero gate/key rows and zero output vectors), which contribute exactly zero, and the config is updated.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .blocks import BlockKind, Units


def make_block_widths_uniform(model: nn.Module, blocks: Sequence[tuple[nn.Module, BlockKind]]) -> int:
    """Pad every block to the widest one with zero units, record that width in the config, and return it."""
    if not blocks:
        return 0
    widths = [kind.width(block) for block, kind in blocks]
    target = max(widths)
    for (block, kind), width in zip(blocks, widths):
        if width < target:
            units = kind.read_units(block)
            zeros = target - width
            kind.append_units(
                block,
                Units(
                    None if units.gate is None else units.gate.new_zeros(zeros, units.gate.shape[1]),
                    units.key.new_zeros(zeros, units.key.shape[1]),
                    units.value.new_zeros(zeros, units.value.shape[1]),
                ),
            )
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
