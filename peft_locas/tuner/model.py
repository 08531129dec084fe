"""``LocasModel``: the PEFT tuner that injects Locas memories into a model's MLP blocks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial, wraps
from typing import Any

from peft import NoMatchingPeftModuleError
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .. import _hook
from ..init.units import check_cloning_width
from ..weights.blocks import BlockKind, find_block_kind, supported_layouts
from ..weights.export import check_pad_to_multiple_of, dequantize_base_model, make_block_widths_uniform
from ..weights.offload import execution_device
from ..weights.projections import protect_layout_
from .config import LocasConfig
from .layer import LocasLayer
from .registration import LOCAS_PREFIX


def iter_mlp_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, BlockKind]]:
    """Every MLP block of ``model`` Locas recognises, as ``(name, module, kind)``; a wrapped block is yielded as its
    ``LocasLayer``. Nothing inside a yielded block is visited again."""
    skip_prefix: str | None = None
    for name, module in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        block = module.get_base_layer() if isinstance(module, LocasLayer) else module
        kind = find_block_kind(block)
        if kind is not None:
            skip_prefix = f"{name}."
            yield name, module, kind


class LocasModel(BaseTuner):
    """Creates Locas memories (arXiv 2602.05085) beside the MLP blocks of a pretrained transformer.

    Use it through PEFT: ``get_peft_model(model, LocasConfig(...))``. Besides PEFT's usual API (adapters, merging,
    unloading) it offers `clip_memory_norms_()` for training loops. ``merge_and_unload()`` returns a *vanilla*
    model: the memory units are appended to the MLP weights, every block is padded with zero units to one common
    width and the config's intermediate size is updated, so the result saves and loads with plain transformers.

    Example:
        >>> from peft import get_peft_model
        >>> import peft_locas
        >>> model = get_peft_model(base_model, peft_locas.LocasConfig(r=64))
    """

    prefix: str = LOCAS_PREFIX
    tuner_layer_cls = LocasLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: LocasConfig, model_config: dict) -> LocasConfig:
        # Targets are found from the model's structure in _prepare_model, not from a model-type table.
        return peft_config

    def _prepare_model(self, peft_config: LocasConfig, model: nn.Module) -> None:
        _check_disk_offload(model)
        for module in model.modules():
            protect_layout_(module)
        blocks = [name for name, _, _ in iter_mlp_blocks(model)]
        if peft_config.target_modules is None:
            if not blocks:
                raise ValueError(
                    f"Locas found no MLP block in {type(model).__name__}: it wraps blocks with a recognised layout "
                    f"({supported_layouts()}) and this model has none, so it is not supported yet."
                )
            peft_config.target_modules = {name.rsplit(".", 1)[-1] for name in blocks}
        self._check_targets(peft_config, model, blocks)

    def _check_targets(self, peft_config: LocasConfig, model: nn.Module, blocks: list[str]) -> None:
        """Validate every matched module before anything is replaced, so a bad config leaves the model untouched."""
        matched = 0
        wrapped = {name for name, module in model.named_modules() if isinstance(module, LocasLayer)}
        for name, module in model.named_modules():
            if any(name.startswith(f"{w}.") for w in wrapped) or not _is_target(peft_config, name):
                continue
            block = module.get_base_layer() if isinstance(module, LocasLayer) else module
            kind = find_block_kind(block)
            if kind is None:
                raise ValueError(
                    f"Locas target {name!r} is a {type(module).__name__}, not an MLP block. Locas wraps whole MLP "
                    f"blocks (such as '{blocks[0] if blocks else 'model.layers.0.mlp'}'), not single projections "
                    f"like 'gate_proj'. Recognised layouts: {supported_layouts()}. Fix `target_modules`, or leave it "
                    "None to wrap every MLP block."
                )
            if peft_config.variant not in ("auto", kind.variant):
                raise ValueError(
                    f"LocasConfig(variant={peft_config.variant!r}) does not fit {name!r}, a {kind.describe()} "
                    f"block: the memory must have the block's form to share its activation and "
                    f"merge exactly. Use variant={kind.variant!r} or 'auto'."
                )
            if peft_config.init_weights is True:
                check_cloning_width(peft_config.r, kind.width(block))
            matched += 1
        if matched == 0:
            raise NoMatchingPeftModuleError(
                f"LocasConfig matched no MLP block (target_modules={peft_config.target_modules!r}, "
                f"layers_to_transform={peft_config.layers_to_transform!r}, "
                f"exclude_modules={peft_config.exclude_modules!r}). MLP blocks in this model: "
                f"{_summarise(blocks)}."
            )

    def _create_and_replace(
        self,
        peft_config: LocasConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: object,
    ) -> None:
        if isinstance(target, LocasLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = LocasLayer(target, find_block_kind(target), adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: object, **kwargs: object) -> Iterator[None]:
        """Route each sample of ``model(x, adapter_names=[...])`` or ``model.generate(x, adapter_names=[...])``
        through the adapter its entry names (PEFT's mixed batches, as LoRA does them): that adapter's memories and
        its copies of ``modules_to_save`` (an adapter without a copy of a module uses the original, as when it is
        active); ``"__base__"`` names the base model. ``generate`` expands each prompt into
        ``max(num_beams, num_return_sequences)`` rows (as transformers resolves them: call, then its
        ``generation_config``, then the model's), so each name is repeated as many times, except in an encoder, which
        reads the prompts themselves.

        Raises:
            ValueError: in training mode, or for a name that is no adapter (PEFT's texts). The layers raise PEFT's
                errors for a length that is not the batch size and for merged adapters.
            TypeError: ``adapter_names`` is not a list or tuple (PEFT's text).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        with self.routing(adapter_names):
            yield

    @contextmanager
    def routing(self, adapter_names: list[str] | tuple[str, ...]) -> Iterator[None]:
        """Within the block, every forward (and ``generate``) routes sample ``i`` of the batch through the adapter
        ``adapter_names[i]`` names, in training mode too: `_enable_peft_forward_hooks`'s mixed batch, for training
        loops that give each sample its own memory (`peft_locas.engine.batched_memorization`). Gradients reach each
        memory from its own samples only.

        Raises:
            ValueError: a name that is no adapter (PEFT's text); the layers raise PEFT's errors for a length that is not
                the batch size and for merged adapters.
        """
        unknown = sorted(set(adapter_names) - {"__base__"} - set(self.peft_config))
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        batch = _MixedBatch(list(adapter_names))
        encoder = _get_encoder(self.model)
        in_encoder = set() if encoder is None else {id(m) for m in encoder.modules()}
        handles = [
            m.register_forward_pre_hook(
                partial(_adapter_names_pre_forward_hook, batch=batch, expand=id(m) not in in_encoder),
                with_kwargs=True,
            )
            for m in self.model.modules()
            if isinstance(m, (LocasLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            with _expanding_in_generate(self.model, batch):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version moves the adapter to the device of the child's first parameter, which is `meta` for a block
        # accelerate offloaded (the memory's values would be lost), and assumes a single-weight layer when unloading
        setattr(parent, child_name, new_module)
        if isinstance(new_module, LocasLayer):
            device = execution_device(new_module.get_base_layer())
            for memory in new_module.locas_memory.values():
                if not any(p.is_meta for p in memory.parameters()):
                    memory.to(device)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """Compose memories exactly into ``adapter_name``: their units side by side, memory i's output scaled by
        ``weights[i]`` (PEFT's ``combination_type="cat"``); see `peft_locas.tuner.composition.add_weighted_adapter`."""
        from .composition import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    def clip_memory_norms_(self, adapter_names: list[str] | None = None) -> None:
        """Project every memory row onto the ball of radius ``max_norm`` of its adapter's config, in place.

        Call it after each optimiser step (the paper's safeguard); adapters with ``max_norm=None`` are skipped.
        Defaults to the active adapters.
        """
        for adapter_name in adapter_names or self.active_adapters:
            max_norm = self.peft_config[adapter_name].max_norm
            if max_norm is None:
                continue
            for module in self.model.modules():
                if isinstance(module, LocasLayer) and adapter_name in module.locas_memory:
                    module.locas_memory[adapter_name].clip_(max_norm)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> nn.Module:
        """Merge the memories into the MLP blocks and return the plain transformers model (a vanilla checkpoint).

        Args:
            progressbar: show a progress bar while unloading.
            safe_merge: check the memories for NaN/inf before merging and raise instead.
            adapter_names: adapters to merge; defaults to the active ones.
            dequantize: first replace every quantized layer of the base model by a float layer, so that the merge is
                exact and the result is a full-precision checkpoint. Without it, a quantized base stays quantized and
                the appended units are re-quantized (a rounding error, warned about).
            pad_to_multiple_of: append all-zero units so that the MLP intermediate size (the config's
                ``intermediate_size``, or ``n_inner`` for GPT-2) is a multiple of this; the outputs stay the same
                (a zero unit adds exactly 0). 256 makes the checkpoint quantize with every GGUF format: llama.cpp's
                k-quants (Q4_K_M, ...) need the rows of ``ffn_down``, as long as the intermediate size, to be whole
                256-wide blocks, and store them in F16 when they are not even whole 32-wide blocks. ``None`` (the
                default) keeps the merged width, e.g. 1536 + r on SmolLM2-135M.

        Raises:
            ValueError: ``pad_to_multiple_of`` is not a positive integer, or is above 1 while the base model is
                quantized and ``dequantize`` is False (growing quantized layers re-quantizes them, which can round
                their weights); nothing has changed then.
        """
        check_pad_to_multiple_of(pad_to_multiple_of)
        if (pad_to_multiple_of or 1) > 1 and not dequantize:
            quantized = [
                name
                for name, module, kind in iter_mlp_blocks(self.model)
                if kind.is_quantized(module.get_base_layer() if isinstance(module, LocasLayer) else module)
            ]
            if quantized:
                raise ValueError(
                    f"pad_to_multiple_of={pad_to_multiple_of} pads a full-precision merge, but MLP blocks of this "
                    f"model are quantized ({_summarise(quantized)}) and re-quantizing them to add units could round "
                    "their weights. Pass dequantize=True too (the export for llama.cpp and vLLM), or leave "
                    "pad_to_multiple_of out."
                )
        if dequantize:
            dequantize_base_model(self.model)
        return self._unload_and_optionally_merge(
            progressbar=progressbar,
            safe_merge=safe_merge,
            adapter_names=adapter_names,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> nn.Module:
        base_widths = {
            kind.width(module.get_base_layer() if isinstance(module, LocasLayer) else module)
            for _, module, kind in iter_mlp_blocks(self.model)
        }
        if merge and len(base_widths) > 1:
            raise ValueError(
                f"Cannot merge and unload: this model's MLP blocks have different widths {sorted(base_widths)}, so "
                "no single intermediate size describes the merged model. Use `merge_adapter()` to merge in place "
                "and keep the Locas wrappers instead."
            )
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge:
            blocks = [(module, kind) for _, module, kind in iter_mlp_blocks(model)]
            make_block_widths_uniform(model, blocks, multiple_of=pad_to_multiple_of or 1)
        return model


def _check_disk_offload(model: nn.Module) -> None:
    """Refuse what PEFT's ``from_pretrained`` does to a base with disk-offloaded blocks: it takes accelerate's hooks
    off and renames the offloaded weights for adapters that wrap single layers, which fails for Locas's block-wrapping
    layers (a ``KeyError`` after loading). ``get_peft_model`` keeps the hooks and works."""
    disk = sorted(name for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk")
    hooked = any(hasattr(module, "_hf_hook") for module in model.modules())
    if disk and not hooked:
        raise ValueError(
            f"Locas cannot load an adapter onto a base whose blocks {_summarise(disk)} are offloaded to disk with "
            "PeftModel.from_pretrained (PEFT renames offloaded weights for single-layer adapters only): create the "
            "adapter with get_peft_model(model, LocasConfig(...)) on the offloaded model, then load its weights with "
            "peft.set_peft_model_state_dict(model, safetensors.torch.load_file(ADAPTER/'adapter_model.safetensors'))"
        )


class _MixedBatch:
    """The adapter name of each input sample, and how many rows ``generate`` is expanding each sample into."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows_per_sample = 1

    def names_per_row(self, expand: bool) -> list[str]:
        if not expand or self.rows_per_sample == 1:
            return self.names
        # transformers expands with repeat_interleave: a sample's rows are consecutive (LoRA repeats names the same way)
        return [name for name in self.names for _ in range(self.rows_per_sample)]


def _adapter_names_pre_forward_hook(
    module: nn.Module, args: tuple, kwargs: dict, batch: _MixedBatch, expand: bool
) -> tuple[tuple, dict]:
    names = batch.names_per_row(expand)
    if isinstance(module, AuxiliaryTrainingWrapper):
        # PEFT's wrapper fails on an adapter without its own copy; that adapter uses the original module when active
        names = [name if name in module._adapters else "__base__" for name in names]
    return args, {**kwargs, "adapter_names": names}


@contextmanager
def _expanding_in_generate(model: nn.Module, batch: _MixedBatch) -> Iterator[None]:
    """Wrap ``model.generate`` for the duration (PeftModel calls it inside the forward hooks) so that the names follow
    the rows it expands the prompts into. Only a ``generate`` call expands: a forward call keeps one name per row."""
    generate = getattr(model, "generate", None)
    if generate is None:
        yield
        return
    own = model.__dict__.get("generate")

    @wraps(generate)
    def expanding_generate(*args: Any, **kwargs: Any) -> Any:
        batch.rows_per_sample = _rows_per_prompt(model, kwargs)
        try:
            return generate(*args, **kwargs)
        finally:
            batch.rows_per_sample = 1

    # an instance attribute, removed on exit, as PeftModel swaps `prepare_inputs_for_generation` during `generate`
    model.generate = expanding_generate
    try:
        yield
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own


def _rows_per_prompt(model: nn.Module, kwargs: dict) -> int:
    """``max(num_beams, num_return_sequences)``, the rows transformers' ``generate`` expands each prompt into, each
    setting taken from the call's arguments, else from its ``generation_config``, else from the model's."""
    sources = (kwargs, kwargs.get("generation_config"), getattr(model, "generation_config", None))

    def setting(name: str) -> int:
        for source in sources:
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return int(value)
        return 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def _get_encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model, else ``None`` (transformers 5 returns the model itself then)."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return None if encoder is model else encoder


def _is_target(config: LocasConfig, name: str) -> bool:
    # an excluded module comes back as a falsy marker object, so truthiness is the whole answer
    return bool(check_target_module_exists(config, name))


def _summarise(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in total)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# the end of the tuner's import closure: finishes a registration the import hook had to postpone (see peft_locas._hook)
_hook.register_if_pending()
