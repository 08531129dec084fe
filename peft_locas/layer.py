"""``LocasLayer``: a PEFT tuner layer that wraps a whole MLP block and adds ``tau * Mem(x)`` to its output."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .blocks import BlockKind, Units
from .config import LocasConfig
from .initialization import auto_tau, clip_rows_, data_free_memory


class LocasLayer(nn.Module, BaseTunerLayer):
    """A Locas memory beside one MLP block.

    Per adapter it holds the memory's ``gate`` (GLU only), ``key`` and ``value`` rows (one row per memory unit) and
    the output scale ``tau``. The memory uses the block's own activation, so it *is* ``r`` extra units of the block:
    :meth:`merge` appends them to the block's projections and :meth:`unmerge` drops them again, both exactly.
    """

    adapter_layer_names = ("locas_gate", "locas_key", "locas_value")
    other_param_names = ("locas_tau",)

    def __init__(self, base_layer: nn.Module, block_kind: BlockKind, adapter_name: str, config: LocasConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.block_kind = block_kind
        self.locas_gate = nn.ParameterDict()
        self.locas_key = nn.ParameterDict()
        self.locas_value = nn.ParameterDict()
        self.locas_tau = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_widths: list[int] = []  # units appended by each merged adapter, in merge order
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def variant(self) -> str:
        return self.block_kind.variant

    def update_layer(self, adapter_name: str, config: LocasConfig) -> None:
        """Create the memory of ``adapter_name`` from the block's weights (see ``LocasConfig.init_weights``)."""
        base_units = self.block_kind.read_units(self.get_base_layer())
        memory = data_free_memory(base_units, config.r, config.init_weights)
        tau = auto_tau(base_units, config.r) if config.tau == "auto" else float(config.tau)
        self.set_memory(adapter_name, memory, tau, dtype=base_units.key.dtype)
        if config.max_norm is not None:
            self.clip_memory_norms_(adapter_name, config.max_norm)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_memory(self, adapter_name: str, memory: Units, tau: float, dtype: Optional[torch.dtype] = None) -> None:
        """(Re)place the memory of ``adapter_name``: rows from ``memory`` (``value`` unscaled) and scale ``tau``.

        The width may differ from the current one (initialisers that grow or compress the memory use this).
        """
        device = next(self.get_base_layer().parameters()).device
        dtype = dtype or memory.key.dtype
        for container, tensor in zip((self.locas_gate, self.locas_key, self.locas_value), memory):
            if tensor is None:
                if adapter_name in container:
                    del container[adapter_name]
            else:
                container[adapter_name] = nn.Parameter(tensor.detach().to(device=device, dtype=dtype).contiguous())
        self.locas_tau[adapter_name] = torch.tensor(float(tau), dtype=torch.float32, device=device)

    def memory_units(self, adapter_name: str) -> Units:
        """The memory as block units (``value`` already scaled by ``tau``): exactly what merging appends."""
        tau = self.locas_tau[adapter_name]
        value = self.locas_value[adapter_name] * tau.to(self.locas_value[adapter_name].dtype)
        gate = self.locas_gate[adapter_name] if adapter_name in self.locas_gate else None
        return Units(gate, self.locas_key[adapter_name], value)

    def memory_width(self, adapter_name: str) -> int:
        return self.locas_key[adapter_name].shape[0]

    def memory_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``tau * Mem(x)`` in the memory's dtype."""
        key = self.locas_key[adapter_name]
        x = self._cast_input_dtype(x, key.dtype)
        activation = self.block_kind.activation(self.get_base_layer())
        hidden = F.linear(x, key)
        if adapter_name in self.locas_gate:
            hidden = activation(F.linear(x, self.locas_gate[adapter_name])) * hidden
        else:
            hidden = activation(hidden)
        hidden = hidden * self.locas_tau[adapter_name].to(hidden.dtype)
        return hidden @ self.locas_value[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.locas_key:
                result = result + self.memory_output(x, adapter_name).to(result.dtype)
        return result

    def clip_memory_norms_(self, adapter_name: str, max_norm: float) -> None:
        """Project each gate/key/value row of ``adapter_name`` onto the L2 ball of radius ``max_norm`` (in place)."""
        for container in (self.locas_gate, self.locas_key, self.locas_value):
            if adapter_name in container:
                clip_rows_(container[adapter_name], max_norm)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Append the memory units of the active (or given) adapters to the wrapped block's projections.

        Args:
            safe_merge: check the units for NaN/inf before touching the block, and raise instead of merging.
            adapter_names: adapters to merge; defaults to the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.locas_key:
                continue
            with torch.no_grad():
                units = Units(*(None if t is None else t.detach() for t in self.memory_units(adapter_name)))
            if safe_merge and not all(torch.isfinite(t).all() for t in units if t is not None):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                )
            self.block_kind.append_units(base, units)
            self.merged_adapters.append(adapter_name)
            self._merged_widths.append(units.key.shape[0])

    def unmerge(self) -> None:
        """Drop the appended units of every merged adapter, restoring the block's original weights exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            appended = self._merged_widths.pop()
            self.block_kind.keep_first_units(base, self.block_kind.width(base) - appended)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # Memories keep their own dtype (fp32 by default, see PEFT's autocast_adapter_dtype); only the device follows.
        device = device or next(self.get_base_layer().parameters()).device
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device != torch.device("meta"):
                container[adapter_name] = container[adapter_name].to(device)

    def __repr__(self) -> str:
        return "locas." + super().__repr__()
