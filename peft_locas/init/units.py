"""Data-free memory initialisation, used when a Locas adapter is created.

The data-driven initialisation (activation statistics over a context, `peft_locas.init.data`) builds on these; this
module needs only the block's weights. Rows are L2-normalised so that every initialisation starts inside the clipping
ball and differs only in *direction*, which keeps the ablations comparable.
"""

from __future__ import annotations

import torch

from ..weights.blocks import Units


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm; all-zero rows stay zero."""
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)


def clip_rows_(weight: torch.Tensor, max_norm: float) -> None:
    """Project every row onto the L2 ball of radius ``max_norm`` in place: ``w <- w * min(1, max_norm / ||w||)``."""
    with torch.no_grad():
        norms = weight.norm(dim=-1, keepdim=True)
        weight.mul_((max_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0))


def param_norm_scores(units: Units) -> torch.Tensor:
    """Per-unit importance without data: product of the unit's gate-row, key-row and value-vector norms."""
    scores = units.key.norm(dim=1) * units.value.norm(dim=1)
    if units.gate is not None:
        scores = scores * units.gate.norm(dim=1)
    return scores


def top_indices(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` largest scores, largest first; ties keep the lower index (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices[:r]


def clone_units(units: Units, index: torch.Tensor) -> Units:
    """Memory units cloned from base units ``index``: normalised gate/key rows, zero value (a no-op memory)."""
    gate = None if units.gate is None else normalize_rows(units.gate[index])
    return Units(gate, normalize_rows(units.key[index]), units.value.new_zeros(len(index), units.value.shape[1]))


def gaussian_units(units: Units, r: int, random_value: bool, generator: torch.Generator | None = None) -> Units:
    """Random unit-norm gate/key rows shaped like ``units``; value random too when ``random_value``, else zero."""

    def draw(like: torch.Tensor) -> torch.Tensor:
        sample = torch.randn(r, like.shape[1], generator=generator, dtype=torch.float32)
        return normalize_rows(sample).to(like.device)

    gate = None if units.gate is None else draw(units.gate)
    value = draw(units.value) if random_value else units.value.new_zeros(r, units.value.shape[1], dtype=torch.float32)
    return Units(gate, draw(units.key), value)


def data_free_memory(units: Units, r: int, init_weights: bool | str) -> Units:
    """The initial memory for ``LocasConfig.init_weights``, in float32.

    ``"data"`` builds the same value-0 Gaussian memory as ``"gaussian"``: a placeholder of the right shape that
    ``init_locas_weights`` or a saved adapter's weights then overwrite.
    """
    units = Units(*(None if t is None else t.float() for t in units))
    if init_weights is True:
        check_cloning_width(r, units.key.shape[0])
        return clone_units(units, top_indices(param_norm_scores(units), r))
    return gaussian_units(units, r, random_value=init_weights is False)


def check_cloning_width(r: int, width: int, alternative: str = "init_weights='gaussian'") -> None:
    """Cloning picks ``r`` distinct base units, so a block must have at least ``r``; ``alternative`` names the
    non-cloning option the message suggests (it differs between construction and ``init_locas_weights``)."""
    if r > width:
        raise ValueError(
            f"LocasConfig(r={r}) exceeds the MLP's intermediate size {width}: cloning base units needs r <= {width}. "
            f"Lower `r`, or use {alternative}."
        )


def auto_tau(units: Units, r: int) -> float:
    """The paper's output scale: mean L2 norm of the base units' output vectors, divided by the memory width."""
    return units.value.float().norm(dim=1).mean().item() / r
