"""Principled, data-driven initialisation of Locas memories (``locas_method.md`` section 3).

The model initialises its own memory: run the frozen backbone over the context, then clone the base units that the
context activates most (``"top_k"``, the default), or write one gradient slot per token (``"gradient"``, Locas-MLP).
``init_locas_weights`` does it in one call, shaped like PEFT's ``initialize_lora_eva_weights``; the two-step form
``get_locas_init_state`` + ``init_locas_weights(model, init_state=...)`` lets the result be cached on disk or computed
on a full-precision copy and applied to another copy (another dtype, a quantized base).

Statistics are taken only over the tokens whose attention mask is 1 and, where labels are given, whose label is not
-100. They are accumulated in float32 in O(intermediate size) memory per layer (``"activation_keys"``: O(hidden
size^2)), so a long text can be streamed in batches, and summed over ranks under ``torch.distributed`` so every rank
selects the same units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from ..distributed import Ranks
from ..tuner.layer import LocasLayer
from ..weights.blocks import Units
from .gradients import gradient_slots
from .keys import activation_key_memories
from .statistics import unit_activity
from .stream import ForwardFn, Stream, default_forward
from .units import auto_tau, check_cloning_width, clone_units, gaussian_units, param_norm_scores, top_indices
from .writing import grow_locas_memory, locas_config, locas_layers, write_locas_memories

#: method -> the memory variants it applies to
METHODS: dict[str, tuple[str, ...]] = {
    "top_k": ("glu", "mlp"),
    "bottom_k": ("glu", "mlp"),
    "random_clone": ("glu", "mlp"),
    "gaussian": ("glu", "mlp"),
    "activation_keys": ("glu", "mlp"),
    "param_norm": ("glu", "mlp"),
    "gradient": ("mlp",),
}
CLONING_METHODS = ("top_k", "bottom_k", "random_clone", "param_norm")
DATA_METHODS = ("top_k", "bottom_k", "activation_keys", "gradient")


@dataclass
class LocasInitState:
    """Initial memories per Locas layer (keyed by module name in the base model), as ``get_locas_init_state`` computed
    them: ``value`` unscaled, float32 on the CPU, ``taus`` the output scales, ``indices`` the cloned base units (cloning
    methods only). Apply it with ``init_locas_weights(model, init_state=state)``; cache it with `save()`."""

    method: str
    memories: dict[str, Units]
    taus: dict[str, float]
    indices: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to one safetensors file."""
        tensors = {f"{name}.indices": index.contiguous() for name, index in self.indices.items()}
        for name, units in self.memories.items():
            tensors.update({f"{name}.{part}": t.contiguous() for part, t in units._asdict().items() if t is not None})
        save_file(tensors, os.fspath(path), metadata={"method": self.method, "taus": json.dumps(self.taus)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocasInitState:
        """Read a state written by `save()`."""
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        taus = json.loads(metadata["taus"])
        memories = {
            name: Units(tensors.get(f"{name}.gate"), tensors[f"{name}.key"], tensors[f"{name}.value"]) for name in taus
        }
        indices = {name: tensors[f"{name}.indices"] for name in taus if f"{name}.indices" in tensors}
        return cls(metadata["method"], memories, taus, indices)


def get_locas_init_state(
    peft_model: PeftModel,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    *,
    method: str = "top_k",
    adapter_name: str = "default",
    forward_fn: ForwardFn | None = None,
    eps: float = 1.0,
    grad_batch_size: int = 16,
    seed: int = 0,
    gather_distributed: bool = True,
    show_progress_bar: bool = True,
) -> LocasInitState:
    """Compute the initial memories of ``adapter_name`` without changing the model.

    Args:
        peft_model: a ``PeftModel`` with a Locas adapter (``get_peft_model(model, LocasConfig(...))``); its memory
            width ``r``, ``tau`` and targets come from the adapter's config.
        dataloader: batches (mappings with ``input_ids`` and optionally ``attention_mask`` and ``labels``). Required by
            ``"top_k"``, ``"bottom_k"``, ``"activation_keys"`` and ``"gradient"``; ignored by the data-free methods.
        method: for both variants (GLU and two-layer MLP):

            - ``"top_k"``: clone the ``r`` units with the largest mean ``|act(W_gate A) * (W_up A)|`` (two-layer MLP:
              ``|act(W_in A)|``) over the data: gate/key rows L2-normalised, value 0;
            - ``"bottom_k"``: the ``r`` least-activated units; ``"random_clone"``: ``r`` random units;
              ``"gaussian"``: random unit rows; ``"param_norm"``: the data-free construction default (largest
              gate/key/value norm products); all with value 0;
            - ``"activation_keys"``: keys (and GLU gates) are the ``r`` leading eigenvectors of the scatter of the
              normalised MLP inputs ``sum_t a_t a_t^T``, value 0. This is our reading of the paper's "normalised
              activations as keys" ablation: the ``r`` directions that best summarise the context's normalised
              activations, which is what NL-SVD keeps from one activation key per token. Needs ``r`` <= hidden size.

            and for two-layer MLPs only, ``"gradient"`` (Locas-MLP): one slot per valid target token ``x_t`` and layer,
            key ``normalize(A_{t-1})`` (the MLP input at the position predicting ``x_t``), value
            ``eps * g_l / ||g||`` with ``g_l = d log p(x_t | x_<t) / d H_l`` the gradient w.r.t. layer ``l``'s MLP
            output at that position and ``||g||`` taken jointly over all layers (keeps their relative scales). The
            memory width becomes the number of tokens; compress it with ``compress_locas_memory``. The per-token
            gradients are exact, which costs the work of one backward pass per token.
        adapter_name: the adapter to initialise.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (default ``model(**batch)``); for
            ``"gradient"`` it must return the logits or an output with ``.logits``.
        eps: ``"gradient"`` step size, the joint norm of each slot's values; keep it <= ``max_norm`` to avoid clipping.
        grad_batch_size: ``"gradient"``: tokens whose gradients one (vmapped) backward pass computes; memory grows
            linearly with it, speed too up to a point.
        seed: seeds ``"random_clone"`` and ``"gaussian"`` (the same on every rank).
        gather_distributed: under ``torch.distributed``, combine every rank's data (statistics summed, gradient slots
            gathered in rank order). Each rank must then see different data, as with a ``DistributedSampler``.
        show_progress_bar: show a progress bar over the batches (on rank 0).
    """
    config = locas_config(peft_model, adapter_name)
    layers = locas_layers(peft_model, adapter_name)
    _check_method(method, layers, adapter_name, config.r, eps, grad_batch_size)
    if method in DATA_METHODS and dataloader is None:
        raise ValueError(f"init_locas_weights: method={method!r} learns from data; pass a dataloader.")
    forward_fn = forward_fn or default_forward
    ranks = Ranks.current() if gather_distributed else Ranks()
    stream = Stream(peft_model, dataloader, forward_fn, ranks, show_progress_bar)
    learned: dict[str, Units] = {}  # memories the data determines entirely
    scores: dict[str, torch.Tensor] = {}  # per-unit scores of top_k / bottom_k
    if method == "gradient":
        learned = gradient_slots(stream, layers, adapter_name, eps, grad_batch_size)
    elif method == "activation_keys":
        learned = activation_key_memories(stream, layers, adapter_name, config.r)
    elif method in ("top_k", "bottom_k"):
        scores = {name: a if method == "top_k" else -a for name, a in unit_activity(stream, layers).items()}
    generator = torch.Generator().manual_seed(seed)
    memories, taus, indices = {}, {}, {}
    for name, layer in layers.items():
        # one layer's base units at a time: on a quantized base each read is a dequantized float copy
        base = layer.block_kind.read_units(layer.get_base_layer())
        units = Units(*(None if t is None else t.detach().float() for t in base))
        if learned:
            memory = learned[name]
        elif method == "gaussian":
            memory = gaussian_units(units, config.r, random_value=False, generator=generator)
        else:
            if method == "random_clone":
                indices[name] = torch.randperm(units.key.shape[0], generator=generator)[: config.r]
            else:
                score = param_norm_scores(units) if method == "param_norm" else scores[name]
                indices[name] = top_indices(score.cpu(), config.r)
            memory = clone_units(units, indices[name].to(units.key.device))
        memories[name] = Units(*(None if t is None else t.detach().float().cpu() for t in memory))
        taus[name] = auto_tau(units, memory.key.shape[0]) if config.tau == "auto" else float(config.tau)
    return LocasInitState(method, memories, taus, indices)


def init_locas_weights(
    peft_model: PeftModel,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    *,
    method: str = "top_k",
    adapter_name: str = "default",
    init_state: LocasInitState | None = None,
    append: bool = False,
    forward_fn: ForwardFn | None = None,
    eps: float = 1.0,
    grad_batch_size: int = 16,
    seed: int = 0,
    gather_distributed: bool = True,
    show_progress_bar: bool = True,
) -> LocasInitState:
    """Initialise the memories of ``adapter_name`` from data, in place; returns the state used (cache it with
    ``state.save(path)``).

    Either computes the state (see `get_locas_init_state()` for ``dataloader``, ``method`` and the other
    arguments) or applies ``init_state``, e.g. one computed on a full-precision copy of the model. The base weights
    are untouched; every memory row obeys ``max_norm``; with a value-0 method the model is exactly the base model
    afterwards. ``append=True`` appends the new units after the existing ones (keeping each memory's ``tau``), which
    is how a gradient memory grows chunk after chunk. The config's ``r`` becomes the new width and ``init_weights``
    ``"data"``, so the saved adapter reloads. Create the optimiser afterwards: the memory parameters are new objects.

    Args:
        peft_model: a ``PeftModel`` with a Locas adapter.
        dataloader: batches with ``input_ids`` (and optionally ``attention_mask``, ``labels``); not with ``init_state``.
        method: the initialisation method (see `get_locas_init_state()`).
        adapter_name: the adapter to initialise.
        init_state: a state computed earlier (`get_locas_init_state()` or `LocasInitState.load`) to apply instead.
        append: append the new units after the existing ones instead of replacing the memory.
        forward_fn: ``forward_fn(model, batch)`` runs a batch, for models not called as ``model(**batch)``.
        eps: the gradient method's value scale.
        grad_batch_size: tokens per backward pass of the gradient method.
        seed: seed of the random methods.
        gather_distributed: sum statistics over ``torch.distributed`` ranks when initialised.
        show_progress_bar: show a tqdm bar over the batches.

    Returns:
        The state that was applied.
    """
    if init_state is None:
        init_state = get_locas_init_state(
            peft_model,
            dataloader,
            method=method,
            adapter_name=adapter_name,
            forward_fn=forward_fn,
            eps=eps,
            grad_batch_size=grad_batch_size,
            seed=seed,
            gather_distributed=gather_distributed,
            show_progress_bar=show_progress_bar,
        )
    elif dataloader is not None:
        raise ValueError("init_locas_weights: pass either a dataloader (to compute the state) or init_state, not both.")
    if append:
        grow_locas_memory(peft_model, init_state.memories, adapter_name)
    else:
        memories = {name: (units, init_state.taus[name]) for name, units in init_state.memories.items()}
        write_locas_memories(peft_model, memories, adapter_name)
    return init_state


def _check_method(
    method: str, layers: Mapping[str, LocasLayer], adapter_name: str, r: int, eps: float, grad_batch_size: int
) -> None:
    """Every argument error, raised before any forward pass."""
    if method not in METHODS:
        raise ValueError(f"init_locas_weights: unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    for name, layer in layers.items():
        if layer.variant not in METHODS[method]:
            valid = ", ".join(m for m, variants in METHODS.items() if layer.variant in variants)
            raise ValueError(
                f"init_locas_weights: method={method!r} needs a two-layer-MLP (Locas-MLP) memory, but {name!r} is a "
                f"{layer.block_kind.describe()} block; for it use one of {valid}."
            )
        memory = layer.locas_memory[adapter_name]
        if method in CLONING_METHODS:
            check_cloning_width(r, layer.block_kind.width(layer.get_base_layer()), alternative="method='gaussian'")
        if method == "activation_keys" and r > memory.key.shape[1]:
            raise ValueError(
                f"init_locas_weights: method='activation_keys' keeps at most the hidden size {memory.key.shape[1]} "
                f"orthogonal keys, but r={r}; lower r or use method='top_k'."
            )
    if method == "gradient" and not eps > 0:
        raise ValueError(f"init_locas_weights: `eps` must be positive (the norm of each gradient slot), got {eps!r}.")
    if method == "gradient" and not (isinstance(grad_batch_size, int) and grad_batch_size >= 1):
        raise ValueError(f"init_locas_weights: `grad_batch_size` must be a positive integer, got {grad_batch_size!r}.")
