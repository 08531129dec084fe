"""NL-SVD: compress a Locas-MLP memory to fewer slots (``locas_method.md`` section 3).

A gradient-initialised memory grows by one slot per memorised token. NL-SVD bounds that growth: each slot is seen as a
unit key with a strength ``s_i = ||k_i|| * ||v_i||``; the leading eigenvectors of the strength-weighted key scatter
``sum_i s_i k_i k_i^T`` become the new (unit, orthogonal) keys, the *probes*, and each new value is chosen so the new
memory reproduces the old memory's output at every probe. The paper sets each new value to the old output at its probe;
that is exact when ``act(0) = 0``. Here the small ``r_new x r_new`` system ``act(P P^T) V' = Mem(P)`` is solved
instead, which is the same for ReLU, GELU and SiLU and stays exact for any activation with an invertible
``act(P P^T)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel

from ..weights.blocks import Units
from .writing import locas_config, locas_layers, write_locas_memories


def principal_keys(scatter: torch.Tensor, key_sum: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of a key scatter ``sum_i w_i k_i k_i^T``, as unit rows, largest first.

    An eigenvector's sign is arbitrary but a key's is not (``act(k . x)`` is not odd), so each one is oriented towards
    the weighted key sum ``sum_i w_i k_i`` (when orthogonal to it: its largest entry positive). This makes the keys
    deterministic, and identical on every rank of a distributed run.
    """
    _, eigenvectors = torch.linalg.eigh(scatter.double())
    keys = eigenvectors.flip(-1)[:, :count].T
    alignment = keys @ key_sum.double()
    largest = keys.gather(1, keys.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(alignment != 0, alignment.sign(), largest.sign())
    return keys * sign[:, None]


def nlsvd(memory: Units, r_new: int, activation: Callable[[torch.Tensor], torch.Tensor]) -> Units:
    """Compress a two-layer-MLP memory (``gate`` None, ``value`` unscaled) to ``r_new`` slots, in float64.

    The result has unit orthogonal keys and reproduces ``act(x K^T) V`` exactly at each of its keys; ``tau`` is
    unchanged, so the scaled outputs agree too.
    """
    key, value = memory.key.double(), memory.value.double()
    key_norms = key.norm(dim=1)
    unit_keys = key / key_norms.clamp_min(torch.finfo(key.dtype).tiny)[:, None]
    weighted = unit_keys * (key_norms * value.norm(dim=1))[:, None]
    probes = principal_keys(weighted.T @ unit_keys, weighted.sum(dim=0), r_new)
    targets = activation(probes @ key.T) @ value
    return Units(None, probes, torch.linalg.solve(activation(probes @ probes.T), targets))


def compress_locas_memory(peft_model: PeftModel, r_new: int, *, adapter_name: str = "default") -> None:
    """NL-SVD-compress every memory of a Locas-MLP adapter to ``r_new`` slots, in place.

    The compressed memory equals the old one at its ``r_new`` probe keys (and, for ReLU, along their rays); elsewhere
    the error is bounded by the memories' Lipschitz constants times the distance to the nearest probe. New values can
    be longer than ``max_norm``; rather than clipping them (which would break exactness), the memory's ``tau`` is
    raised and the values shrunk by the same factor. The adapter's ``r`` becomes ``r_new`` and ``init_weights``
    ``"data"``, so the saved adapter reloads at the new width. Create the optimiser afterwards.
    """
    config = locas_config(peft_model, adapter_name)
    layers = locas_layers(peft_model, adapter_name)
    for name, layer in layers.items():
        memory = layer.locas_memory[adapter_name]
        if memory.gate is not None:
            raise ValueError(
                f"compress_locas_memory: NL-SVD compresses two-layer-MLP (Locas-MLP) memories, but {name!r} holds a "
                "GLU memory (gate, key, value); train a GLU memory at its width or re-initialise it with a smaller r."
            )
        if isinstance(r_new, bool) or not isinstance(r_new, int) or not 1 <= r_new < memory.width:
            raise ValueError(
                f"compress_locas_memory: r_new must be an integer from 1 to {memory.width - 1} (below the current "
                f"width {memory.width} of {name!r}), got {r_new!r}."
            )
        if r_new > memory.key.shape[1]:
            raise ValueError(
                f"compress_locas_memory: r_new={r_new} exceeds the hidden size {memory.key.shape[1]}, the most "
                "orthogonal probe keys NL-SVD can keep; choose r_new <= the hidden size."
            )
    compressed = {}
    with torch.no_grad():
        for name, layer in layers.items():
            memory = layer.locas_memory[adapter_name]
            units = nlsvd(
                Units(None, memory.key, memory.value), r_new, layer.block_kind.activation(layer.get_base_layer())
            )
            tau = memory.tau.item()
            if config.max_norm is not None:
                shrink = max(1.0, units.value.norm(dim=1).max().item() / config.max_norm)
                units, tau = units._replace(value=units.value / shrink), tau * shrink
            compressed[name] = (units, tau)
    write_locas_memories(peft_model, compressed, adapter_name)
