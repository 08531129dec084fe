"""The few collective operations the memorisation engine and data-driven initialisation need, as no-ops in a single
process.

The engine does its own data parallelism instead of wrapping the model in ``DistributedDataParallel``: a memory is
small, so every rank holds all of it and the ranks sum their gradients with one all-reduce per step. That keeps the
model object the caller passed (a ``PeftModel`` whose adapter can be saved, merged and clipped as usual) and works the
same under ``torchrun`` and ``accelerate launch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

    @contextmanager
    def failing_together(self, what: str) -> Iterator[None]:
        """Run a local phase (no collective in it) so that an error on one rank is an error on every rank: once all
        ranks are through the phase they exchange their errors; the failing rank raises its own, the others a
        ``ValueError`` naming the first failed rank and its error. Without this, the other ranks would wait forever
        in the next collective for a rank that has left."""
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # re-raised below, once every rank knows
            if not self.distributed:
                raise
            error = exc
        if not self.distributed:
            return
        messages = self.gather(None if error is None else f"{type(error).__name__}: {str(error).strip()}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise ValueError(f"{what}: rank {rank} failed: {message}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
