"""``LocasLayer``: a PEFT tuner layer that wraps a whole MLP block and adds ``tau * Mem(x)`` to its output."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..init.units import auto_tau, data_free_memory
from ..weights.blocks import BlockKind, Units
from ..weights.memory import LocasMemory, stacked_output
from ..weights.offload import execution_device
from ..weights.projections import projection_size
from .config import LocasConfig


class LocasLayer(nn.Module, BaseTunerLayer):
    """The Locas memories (one per adapter) beside one MLP block.

    A memory uses the block's own activation, so it *is* ``r`` extra units of the block: `merge()` appends them
    to the block's projections and `unmerge()` drops them again, both exactly.

    Like every PEFT tuner layer it exposes ``in_features`` and ``out_features`` (what PEFT's
    ``_get_in_out_features`` reads): the sizes of the block's input and output (the hidden size for transformer MLP
    blocks), which merging leaves unchanged.
    """

    adapter_layer_names = ("locas_memory",)

    def __init__(self, base_layer: nn.Module, block_kind: BlockKind, adapter_name: str, config: LocasConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.block_kind = block_kind
        block = self.get_base_layer()
        # read from the layer sizes, not the weights: cheap for quantized and offloaded blocks
        self.in_features = projection_size(block_kind.projections(block)[0])[1]
        self.out_features = projection_size(block_kind.output_projection(block))[0]
        self.locas_memory = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # per merged adapter, in merge order: units appended, and an exact restorer for quantized blocks
        self._merge_log: list[tuple[int, Callable[[], None] | None]] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def variant(self) -> str:
        """``"glu"`` or ``"mlp"``: the form of the wrapped block, and so of its memories."""
        return self.block_kind.variant

    def update_layer(self, adapter_name: str, config: LocasConfig) -> None:
        """Create the memory of ``adapter_name`` from the block's weights (see ``LocasConfig.init_weights``)."""
        base_units = self.block_kind.read_units(self.get_base_layer())
        if base_units.key.is_meta:
            # weights that are nowhere to be read: PEFT's `from_pretrained` takes accelerate's hooks off an offloaded
            # model before it creates the adapter, then loads the adapter's saved weights and tau over it
            memory = Units(*(None if t is None else torch.zeros(config.r, t.shape[1]) for t in base_units))
            tau = 1.0 if config.tau == "auto" else float(config.tau)
        else:
            memory = data_free_memory(base_units, config.r, config.init_weights)
            tau = auto_tau(base_units, config.r) if config.tau == "auto" else float(config.tau)
        self.set_memory(adapter_name, memory, tau, dtype=base_units.key.dtype)
        if config.max_norm is not None:
            self.locas_memory[adapter_name].clip_(config.max_norm)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_memory(self, adapter_name: str, memory: Units, tau: float, dtype: torch.dtype | None = None) -> None:
        """(Re)place the memory of ``adapter_name`` by ``memory`` (``value`` unscaled) with output scale ``tau``.

        The width may differ from the current one (initialisers that grow or compress a memory use this). A replaced
        memory's dtype (unless ``dtype`` is given) and trainability carry over to the new one.
        """
        device = execution_device(self.get_base_layer())  # not `meta` for an offloaded block
        old = self.locas_memory[adapter_name] if adapter_name in self.locas_memory else None
        dtype = dtype or (old.key.dtype if old is not None else memory.key.dtype)
        self.locas_memory[adapter_name] = LocasMemory(memory, tau, device=device, dtype=dtype)
        if old is not None:
            self.locas_memory[adapter_name].requires_grad_(old.key.requires_grad)

    def memory_output(self, x: torch.Tensor, adapter_name: str, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """``tau * Mem(x)`` of one adapter, computed in the memory's dtype; with ``add_to``, ``add_to`` plus it in
        ``add_to``'s dtype (fused where the dtypes agree, see `LocasMemory.forward`)."""
        memory = self.locas_memory[adapter_name]
        x = self._cast_input_dtype(x, memory.key.dtype)
        return memory(x, self.block_kind.activation(self.get_base_layer()), add_to=add_to)

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        self._check_forward_args(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.locas_memory:
                result = self.memory_output(x, adapter_name, add_to=result)
        return result

    def _check_forward_args(self, x: torch.Tensor, adapter_names: list[str] | None) -> None:
        """Refuse a mixed batch PEFT's LoRA layers refuse, with their words (code in the ecosystem matches them).

        Raises:
            ValueError: ``adapter_names`` has not one entry per sample of ``x`` (dimension 0), or adapters are merged.
        """
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            # the merged units would act on every sample, whichever adapter it names
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample of the batch through the memory its entry of ``adapter_names`` names (``"__base__"``, or an
        adapter without a memory here: none). Differentiable, so a training loop can route rows too
        (`LocasModel.routing`). When every sample names a memory here and they all have one shape, the memories run
        stacked, one batched matmul per projection (`stacked_output`); otherwise each adapter's samples are gathered."""
        result = self.base_layer(x, *args, **kwargs)
        memories = [self.locas_memory[name] for name in adapter_names if name in self.locas_memory]
        if len(memories) == len(adapter_names) and all(memories[0].stackable_with(m) for m in memories[1:]):
            x = self._cast_input_dtype(x, memories[0].key.dtype)
            return stacked_output(memories, x, self.block_kind.activation(self.get_base_layer()), add_to=result)
        for adapter_name in set(adapter_names) & set(self.locas_memory):
            rows = [i for i, name in enumerate(adapter_names) if name == adapter_name]
            result[rows] += self.memory_output(x[rows], adapter_name).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append the memory units of the active (or given) adapters to the wrapped block's projections.

        Args:
            safe_merge: check the units for NaN/inf first, and raise without touching the block.
            adapter_names: adapters to merge; defaults to the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        self.block_kind.check_mergeable(base)
        if self.block_kind.is_quantized(base):
            warnings.warn(
                "Merging a Locas memory into a quantized MLP block re-quantizes its weights with the appended units, "
                "so outputs differ from the unmerged model by rounding (measured: 5-25% of the memory's effect on the "
                "logits with 4-bit, 1-10% with 8-bit; see the quantized-bases guide). For an exact full-precision "
                "checkpoint use "
                "`merge_and_unload(dequantize=True)`.",
                stacklevel=2,
            )
        for adapter_name in adapter_names:
            if adapter_name not in self.locas_memory:
                continue
            with torch.no_grad():
                units = self.block_kind.units_for_merge(base, self.locas_memory[adapter_name].units())
            if safe_merge and not all(torch.isfinite(t).all() for t in units if t is not None):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            restore = self.block_kind.snapshot(base)
            self.block_kind.append_units(base, units)
            self.merged_adapters.append(adapter_name)
            self._merge_log.append((units.key.shape[0], restore))

    def unmerge(self) -> None:
        """Drop the appended units of every merged adapter, restoring the block's original weights exactly (for
        quantized blocks by putting back the weights saved at merge time, since re-quantizing would round)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            appended, restore = self._merge_log.pop()
            if restore is not None:
                restore()
            else:
                self.block_kind.keep_first_units(base, self.block_kind.width(base) - appended)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # A memory keeps its own dtype (fp32 by default, see PEFT's autocast_adapter_dtype); only the device follows.
        memory = self.locas_memory[adapter_name] if adapter_name in self.locas_memory else None
        if memory is not None and not any(p.is_meta for p in memory.parameters()):
            memory.to(device or execution_device(self.get_base_layer()))

    def __repr__(self) -> str:
        return "locas." + super().__repr__()
