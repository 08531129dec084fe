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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .blocks import Units
from .distributed import Ranks
from .initialization import (
    auto_tau,
    check_cloning_width,
    clone_units,
    gaussian_units,
    normalize_rows,
    param_norm_scores,
    top_indices,
)
from .layer import LocasLayer
from .nlsvd import principal_keys
from .offload import execution_device
from .resize import grow_locas_memory, locas_config, locas_layers, write_locas_memories

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
IGNORE_INDEX = -100

ForwardFn = Callable[[PeftModel, dict[str, Any]], Any]


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
    forward_fn = forward_fn or _forward
    ranks = Ranks.current() if gather_distributed else Ranks()
    stream = _Stream(peft_model, dataloader, forward_fn, ranks, show_progress_bar)
    learned: dict[str, Units] = {}  # memories the data determines entirely
    scores: dict[str, torch.Tensor] = {}  # per-unit scores of top_k / bottom_k
    if method == "gradient":
        learned = _gradient_slots(stream, layers, adapter_name, eps, grad_batch_size)
    elif method == "activation_keys":
        learned = _activation_key_memories(stream, layers, adapter_name, config.r)
    elif method in ("top_k", "bottom_k"):
        scores = {name: a if method == "top_k" else -a for name, a in _unit_activity(stream, layers).items()}
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


def _forward(model: PeftModel, batch: dict[str, Any]) -> Any:
    return model(**batch)


def _attention(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def _token_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    """Tokens that count: attention mask 1 and, where labels are given, label not -100."""
    labels = batch.get("labels")
    return _attention(batch) if labels is None else _attention(batch) & (labels != IGNORE_INDEX)


def _target_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    """Positions ``p`` predicting a counted token at ``p + 1`` (shape ``(batch, length - 1)``)."""
    return _attention(batch)[:, :-1] & _token_mask(batch)[:, 1:]


class _Stream:
    """Runs the frozen base model (adapters disabled, eval mode) over the dataloader, validating every batch."""

    def __init__(
        self,
        peft_model: PeftModel,
        dataloader: Iterable[Mapping[str, Any]] | None,
        forward_fn: ForwardFn,
        ranks: Ranks,
        show_progress_bar: bool,
    ) -> None:
        self.model, self.dataloader, self.forward_fn, self.ranks = peft_model, dataloader, forward_fn, ranks
        self.show_progress_bar = show_progress_bar and ranks.is_main
        self.device = next(p.device for p in peft_model.parameters() if p.device.type != "meta")
        self.seen = 0  # batches of the current pass on this rank

    @contextmanager
    def frozen_base(self) -> Iterator[None]:
        # Restore each module's own mode (a PeftModel can be in train mode around an eval-mode base model) and each
        # parameter's trainability (leaving `disable_adapter()` makes the active adapter trainable, even when frozen).
        modes = [(module, module.training) for module in self.model.modules()]
        trainable = [(parameter, parameter.requires_grad) for parameter in self.model.parameters()]
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for module, training in modes:
                module.training = training
            for parameter, requires_grad in trainable:
                parameter.requires_grad_(requires_grad)

    def batches(
        self, mask_fn: Callable[[Mapping[str, Any]], torch.Tensor]
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Each batch on the model's device with its ``mask_fn`` mask, counted in ``self.seen``; local (no collective),
        so that `run` can make every rank fail together. Raises ``ValueError`` for an invalid batch."""
        for index, batch in enumerate(tqdm(self.dataloader, desc="Locas init", disable=not self.show_progress_bar)):
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(
                    f"init_locas_weights: batch {index} has no `input_ids` (got {found}); the dataloader must yield "
                    "mappings with `input_ids` (and optionally `attention_mask`, `labels`), e.g. a tokenizer's output."
                )
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = mask_fn(batch)
            if not mask.any():
                raise ValueError(
                    f"init_locas_weights: batch {index} has no valid token (attention_mask 1 and labels != -100"
                    f"{', followed by a valid target' if mask_fn is _target_mask else ''}); drop it or fix its masks."
                )
            self.seen += 1
            yield batch, mask

    @contextmanager
    def run(self) -> Iterator[None]:
        """Around a pass over `batches`: an error on any rank ends the pass on every rank (`Ranks.failing_together`:
        no rank is left waiting in the next collective), and a pass with no batch on any rank is an error."""
        self.seen = 0
        with self.ranks.failing_together("init_locas_weights"):
            yield
        total = torch.tensor([self.seen], device=self.device)
        self.ranks.sum_([total])
        if total.item() == 0:
            raise ValueError("init_locas_weights: the dataloader is empty; give it at least one batch of the context.")

    def accumulate(self, modules: Mapping[str, torch.nn.Module], update: Callable[[str, torch.Tensor], None]) -> int:
        """Run the base model over every batch (no grad), calling ``update(name, rows)`` with the counted tokens' rows
        of each module's input; returns the number of counted tokens on this rank."""
        current: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
                update(name, _select(args[0], current["mask"], name))

            return pre_hook

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
        tokens = 0
        try:
            with self.run(), self.frozen_base(), torch.no_grad():
                for batch, mask in self.batches(_token_mask):
                    current["mask"] = mask
                    tokens += int(mask.sum())
                    self.forward_fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return tokens


def _select(activation: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of a ``(..., features)`` activation at the batch's counted tokens."""
    if activation.shape[:-1].numel() != mask.numel():
        raise ValueError(
            f"init_locas_weights: the MLP activations of {name!r} have shape {tuple(activation.shape)}, which does "
            f"not align with the batch's {tuple(mask.shape)} tokens; pass a `forward_fn` that runs the model on the "
            "batch as given."
        )
    return activation.reshape(-1, activation.shape[-1])[mask.reshape(-1)]


def _unit_activity(stream: _Stream, layers: Mapping[str, LocasLayer]) -> dict[str, torch.Tensor]:
    """Mean ``|M_j|`` of every base unit over the counted tokens, ``M`` being the input of the block's output
    projection (``act(W_gate A) * (W_up A)``, or ``act(W_in A)``), exactly as the backbone computes it."""
    # every BlockKind lists its output projection last
    projections = {name: layer.block_kind.output_projection(layer.get_base_layer()) for name, layer in layers.items()}
    sums = {
        name: torch.zeros(layer.block_kind.width(layer.get_base_layer()), device=execution_device(projections[name]))
        for name, layer in layers.items()
    }

    def update(name: str, rows: torch.Tensor) -> None:
        sums[name] += rows.float().abs().sum(dim=0)

    count = torch.tensor(float(stream.accumulate(projections, update)), device=stream.device)
    stream.ranks.sum_([count, *sums.values()])
    return {name: total / count.item() for name, total in sums.items()}


def _activation_key_memories(
    stream: _Stream, layers: Mapping[str, LocasLayer], adapter_name: str, r: int
) -> dict[str, Units]:
    """Keys (and GLU gates) the ``r`` leading eigenvectors of ``sum_t a_t a_t^T`` over the normalised MLP inputs
    ``a_t``; value 0."""
    current = {name: layer.locas_memory[adapter_name] for name, layer in layers.items()}
    scatters = {
        name: m.key.new_zeros(m.key.shape[1], m.key.shape[1], dtype=torch.float32) for name, m in current.items()
    }
    sums = {name: m.key.new_zeros(m.key.shape[1], dtype=torch.float32) for name, m in current.items()}

    def update(name: str, rows: torch.Tensor) -> None:
        rows = normalize_rows(rows.float())
        scatters[name] += rows.T @ rows
        sums[name] += rows.sum(dim=0)

    stream.accumulate(layers, update)
    stream.ranks.sum_([*scatters.values(), *sums.values()])
    memories = {}
    for name, memory in current.items():
        keys = principal_keys(scatters[name], sums[name], r).float()
        value = keys.new_zeros(r, memory.value.shape[1])
        memories[name] = Units(None if memory.gate is None else keys, keys, value)
    return memories


def _gradient_slots(
    stream: _Stream, layers: Mapping[str, LocasLayer], adapter_name: str, eps: float, grad_batch_size: int
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
            for batch, mask in stream.batches(_target_mask):
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
