"""``LocasConfig``: the PEFT configuration of a Locas memory adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .. import _hook
from .registration import LOCAS_PEFT_TYPE

VARIANTS = ("auto", "glu", "mlp")


@dataclass
class LocasConfig(PeftConfig):
    """Configuration of a Locas memory: a small FFN-shaped side memory added to each targeted MLP block.

    Each targeted block computes ``MLP(x) + tau * Mem(x)``. With ``variant="glu"`` the memory is
    ``Mem(x) = V^T (act(G x) * (K x))`` (Llama/Qwen/Mistral/Gemma/Phi-3 blocks); with ``variant="mlp"`` it is
    ``Mem(x) = V^T act(K x)`` (GPT-2/GPT-NeoX blocks). ``act`` is always the block's own activation, which is what
    makes merging the memory into the block exact.

    Args:
        r: Memory width: the number of memory units (rows of ``G``, ``K`` and ``V``) per targeted block.
        variant: ``"auto"`` picks the variant matching each block's structure; ``"glu"`` / ``"mlp"`` assert it.
        target_modules: Names (or a regex) of the MLP *blocks* to wrap, e.g. ``["mlp"]``. ``None`` finds every MLP
            block of the model by structure. Single projections such as ``gate_proj`` are not valid targets.
        exclude_modules: Names (or a regex) of blocks not to wrap.
        layers_to_transform: Layer indices to wrap (an int or a list); ``None`` wraps every layer.
        layers_pattern: Name of the module list holding the layers (e.g. ``"layers"`` or ``"h"``); only used with
            ``layers_to_transform``.
        tau: Output scale. ``"auto"`` uses, per block, the mean L2 norm of the base down-projection's per-unit output
            vectors divided by ``r`` (the paper's rule); a positive float fixes it for every block.
        max_norm: Radius of the ball each memory row is projected onto by ``clip_memory_norms_()``; ``None`` disables
            clipping. With ``1.0`` this is the paper's ``w / max(||w||, 1)``.
        init_weights: ``True`` (default): gate/key rows cloned from the ``r`` base units with the largest product of
            gate-row, up-row and down-column norms, each row L2-normalised, value 0 (the wrapped model is exactly the
            base model). ``"gaussian"``: random unit-norm gate/key rows, value 0. ``False``: random unit-norm rows for
            gate, key *and* value (a non-identity adapter, for tests; PEFT's convention). ``"data"``: the memory is
            initialised from data by ``init_locas_weights`` (which sets this value, like LoRA's ``"eva"``); at
            construction, e.g. when a saved adapter is loaded, a placeholder of the right shape (random unit-norm
            gate/key rows, value 0) is built without the ``r <= intermediate size`` limit of cloning, since a memory
            grown from data may be wider than its block.
        modules_to_save: Extra modules to train fully and save with the adapter.
    """

    r: int = field(default=64, metadata={"help": "Memory width (number of memory units per MLP block)."})
    variant: Literal["auto", "glu", "mlp"] = field(
        default="auto", metadata={"help": "'auto', 'glu' (gate/key/value memory) or 'mlp' (key/value memory)."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "MLP blocks to wrap (names or regex). None: every MLP block, found by structure."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "MLP blocks not to wrap (names or regex)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to wrap; None wraps all layers."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h'; used with layers_to_transform."}
    )
    tau: float | Literal["auto"] = field(
        default="auto", metadata={"help": "Output scale: 'auto' (mean down-projection unit norm / r) or a float."}
    )
    max_norm: float | None = field(
        default=1.0, metadata={"help": "Row-norm clipping radius used by clip_memory_norms_(); None disables."}
    )
    init_weights: bool | Literal["gaussian", "data"] = field(
        default=True,
        metadata={
            "help": "True: clone top units by parameter norms (value 0); 'gaussian'; False: random non-zero; "
            "'data': set by init_locas_weights (construction builds a placeholder)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules to train fully and save beside the memory."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LOCAS_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(
                "LocasConfig: `r` must be a positive integer (the number of memory units per MLP block), "
                f"got {self.r!r}."
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"LocasConfig: unknown `variant` {self.variant!r}; choose one of {', '.join(VARIANTS)}.")
        if self.tau != "auto" and (
            isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0
        ):
            raise ValueError(f"LocasConfig: `tau` must be 'auto' or a positive number, got {self.tau!r}.")
        if self.max_norm is not None and (
            isinstance(self.max_norm, bool) or not isinstance(self.max_norm, (int, float)) or not self.max_norm > 0
        ):
            raise ValueError(
                "LocasConfig: `max_norm` must be a positive number, or None to disable clipping, "
                f"got {self.max_norm!r}."
            )
        if not (isinstance(self.init_weights, bool) or self.init_weights in ("gaussian", "data")):
            raise ValueError(
                f"LocasConfig: unknown `init_weights` {self.init_weights!r}; use True (clone top units), "
                "'gaussian', False (random, non-identity) or 'data' (filled by `init_locas_weights(model, dataloader, "
                "method=...)`, which also sets it)."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "LocasConfig: `layers_pattern` only applies together with `layers_to_transform`; set both or neither."
            )


# a root of the tuner's import closure, like peft_locas.tuner.model: finishes a registration the import hook had to
# postpone
_hook.register_if_pending()
