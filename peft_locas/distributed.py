"""The few collective operations the memorisation engine and data-driven initialisation need, as no-ops in a single
process.

The engine does its own data parallelism instead of wrapping the model in ``DistributedDataParallel``: a memory is
small, so every rank holds all of it and the ranks sum their gradients with one all-reduce per step. That keeps the
model object the caller passed (a ``PeftModel`` whose adapter can be saved, merged and clipped as usual) and works the
same under ``torchrun`` and ``accelerate launch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the (possibly single-process) group."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group if one is initialised with more than one rank, else a single process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> float:
        """The sum of a scalar over all ranks, in float64 (exact enough to add many chunks' NLL sums)."""
        total = value.detach().to(torch.float64).reshape(1)
        if self.distributed:
            dist.all_reduce(total)
        return total.item()

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the ranks."""
        if self.distributed:
            for tensor in tensors:
                dist.all_reduce(tensor)

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (any picklable object of our own), in rank order."""
        if not self.distributed:
            return [value]
        gathered: list[object] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum_gradients_(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over the ranks (a missing gradient counts as zero), with a
        single all-reduce of the flattened gradients."""
        if not self.distributed:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
        dist.all_reduce(flat)
        for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
            parameter.grad = grad.view_as(parameter)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
