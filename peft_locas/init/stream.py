"""The token stream data-driven initialisation reads (`peft_locas.init.data`): the frozen base model (adapters
disabled, eval mode) run over a dataloader, every batch validated, the tokens that count masked, and an error on any
rank ending the pass on every rank.

Tokens count where the attention mask is 1 and, where labels are given, the label is not -100 (`token_mask`); a
gradient slot is written at a position whose next token counts (`target_mask`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from ..distributed import Ranks

IGNORE_INDEX = -100

ForwardFn = Callable[[PeftModel, dict[str, Any]], Any]


def default_forward(model: PeftModel, batch: dict[str, Any]) -> Any:
    return model(**batch)


def attention_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def token_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    """Tokens that count: attention mask 1 and, where labels are given, label not -100."""
    labels = batch.get("labels")
    return attention_mask(batch) if labels is None else attention_mask(batch) & (labels != IGNORE_INDEX)


def target_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    """Positions ``p`` predicting a counted token at ``p + 1`` (shape ``(batch, length - 1)``)."""
    return attention_mask(batch)[:, :-1] & token_mask(batch)[:, 1:]


class Stream:
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
                    f"{', followed by a valid target' if mask_fn is target_mask else ''}); drop it or fix its masks."
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
                update(name, select_rows(args[0], current["mask"], name))

            return pre_hook

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
        tokens = 0
        try:
            with self.run(), self.frozen_base(), torch.no_grad():
                for batch, mask in self.batches(token_mask):
                    current["mask"] = mask
                    tokens += int(mask.sum())
                    self.forward_fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return tokens


def select_rows(activation: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of a ``(..., features)`` activation at the batch's counted tokens."""
    if activation.shape[:-1].numel() != mask.numel():
        raise ValueError(
            f"init_locas_weights: the MLP activations of {name!r} have shape {tuple(activation.shape)}, which does "
            f"not align with the batch's {tuple(mask.shape)} tokens; pass a `forward_fn` that runs the model on the "
            "batch as given."
        )
    return activation.reshape(-1, activation.shape[-1])[mask.reshape(-1)]
