"""Gradient slots (``"gradient"``, Locas-MLP): one memory slot per token of the context, keyed by its normalised MLP
input, valued by the normalised gradient of its next token's log-likelihood w.r.t. each MLP output."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..tuner.layer import LocasLayer
from ..weights.blocks import Units
from .stream import Stream, target_mask
from .units import normalize_rows


def gradient_slots(
    stream: Stream, layers: Mapping[str, LocasLayer], adapter_name: str, eps: float, grad_batch_size: int
) -> dict[str, Units]:
    """One slot per counted target token and layer: key ``normalize(A)``, value ``eps * g_l / ||g||`` (see
    `get_locas_init_state()`). ``g_l`` is read from a zero tensor added to each MLP output: the gradient w.r.t. it
    is the gradient w.r.t. that output, while every path through the network stays intact."""
    names = list(layers)
    inputs: dict[str, torch.Tensor] = {}
    offsets: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., torch.Tensor]:
        def add_offset(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            inputs[name] = args[0].detach()
            offsets[name] = torch.zeros_like(output, requires_grad=True)
            return output + offsets[name]

        return add_offset

    current = {name: layer.locas_memory[adapter_name] for name, layer in layers.items()}
    keys = {name: [torch.zeros(0, memory.key.shape[1])] for name, memory in current.items()}
    values = {name: [torch.zeros(0, memory.value.shape[1])] for name, memory in current.items()}
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with stream.run(), stream.frozen_base(), torch.enable_grad():
            for batch, mask in stream.batches(target_mask):
                outputs = stream.forward_fn(stream.model, batch)
                logits = outputs.logits if hasattr(outputs, "logits") else outputs
                labels = batch.get("labels")
                targets = torch.where(mask, (batch["input_ids"] if labels is None else labels)[:, 1:], 0)
                log_probs = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
                per_token = []
                for chunk in mask.nonzero().split(grad_batch_size):  # one vmapped backward per chunk of tokens
                    rows, b, p = torch.arange(len(chunk)), chunk[:, 0], chunk[:, 1]
                    one_hot = log_probs.new_zeros(len(chunk), *log_probs.shape)
                    one_hot[rows, b, p] = 1
                    grads = torch.autograd.grad(
                        log_probs, [offsets[n] for n in names], one_hot, retain_graph=True, is_grads_batched=True
                    )
                    per_token.append(torch.stack([grad[rows, b, p].float() for grad in grads], dim=1))
                g = torch.cat(per_token)  # (tokens, layers, d)
                g = eps * g / g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny)[:, None, None]
                for i, name in enumerate(names):
                    keys[name].append(normalize_rows(inputs[name][:, :-1][mask].float()).cpu())
                    values[name].append(g[:, i].cpu())
                inputs.clear()
                offsets.clear()
    finally:
        for handle in handles:
            handle.remove()
    slots = {name: Units(None, torch.cat(keys[name]), torch.cat(values[name])) for name in names}
    if stream.ranks.distributed:
        gathered = stream.ranks.gather(slots)
        slots = {
            name: Units(None, torch.cat([g[name].key for g in gathered]), torch.cat([g[name].value for g in gathered]))
            for name in names
        }
    return slots
