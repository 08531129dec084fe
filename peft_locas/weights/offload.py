"""Blocks whose weights accelerate offloaded to the CPU or disk (``device_map`` entries ``"cpu"``/``"disk"``, what
``device_map="auto"`` produces when a model does not fit): their parameters sit on the ``meta`` device and an
``AlignDevicesHook`` loads them for each forward. Locas reads such weights the way the hooks do, only while reading,
and keeps a memory on the device the block computes on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s own weights off its execution device (an offloading hook)."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False))


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Within the block, an offloaded ``module``'s weights are real tensors on its execution device (accelerate's
    ``align_module_device``); other modules are left as they are. Tensors read inside stay valid after it."""
    if not is_offloaded(module):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def execution_device(block: nn.Module) -> torch.device:
    """The device ``block`` computes on: its parameters' device, or, for an offloaded block (parameters on ``meta``),
    its hooks' execution device (the CPU when none says otherwise)."""
    for parameter in block.parameters():
        if not parameter.is_meta:
            return parameter.device
    for module in block.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.device("cpu")
