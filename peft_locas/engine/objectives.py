"""What `memorize()` trains a memory to do on each chunk: predict the next token, or match a long-context teacher.

- ``"ntp"``, next-token prediction: the summed NLL of the chunk's tokens, each predicted from the short window the
  student sees (TempLoRA's objective, and the one the scores measure).
- ``"distill"``, self-distillation: the summed ``KL(teacher || student)`` of the next-token distributions at the same
  positions, where the teacher is the same model *without* the memory reading a much longer window of the text, and
  the student is the model *with* the memory reading the short window. The memory thus learns to make up for the
  context the student cannot see, and to change nothing the teacher would not. The Locas authors train memories this
  way beside next-token prediction (``locas_method.md``); Cartridges (Eyuboglu et al., arXiv 2506.06266, "context
  distillation") distil a long-context teacher into a trainable KV cache the same way.

Both loss functions take the student's logits at the scored positions and return a float32 *sum* over positions; the
engine divides by the chunk's scored tokens (summed over ranks), so every rank's part adds up to the chunk's mean.

A teacher is stored as its top-k tokens per position (`TeacherTargets`): the KL is then the exact KL between the two
distributions coarse-grained to k + 1 outcomes (the teacher's k tokens, and "any other token"). By the data
processing inequality this is a lower bound of the full KL, it is zero exactly when the two models agree on those
outcomes, and the teacher costs ``O(T * k)`` memory instead of ``O(T * vocabulary)`` per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# log-probabilities are clamped here before use: an underflowed probability (log 0 = -inf) would turn 0 * inf into NaN
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's next-token distributions at ``T`` scored positions, float32, on the model's device.

    ``log_probs`` is ``(T, k)``: the log-probabilities of the teacher's top-k tokens, whose ids are ``ids`` (``(T, k)``
    long); ``rest`` (``(T,)``) is the log-probability of all other tokens together, ``None`` when ``k`` covers the
    vocabulary. Without top-k (``ids`` None) ``log_probs`` is ``(T, V)``, the whole distribution.
    """

    log_probs: torch.Tensor
    ids: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int | None) -> TeacherTargets:
        """From the teacher's logits ``(T, V)`` (any float dtype): the ``top_k`` most probable tokens per position
        (``top_k >= V`` keeps all of them, in order of probability), or the full distribution when ``None``."""
        log_probs = logits.detach().float().log_softmax(-1)
        if top_k is None:
            return cls(log_probs)
        top, ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
        return cls(top, ids, _log_rest(log_probs, ids))

    @property
    def top_mass(self) -> torch.Tensor:
        """``(T,)``: the teacher's probability mass kept exactly per position (1 without top-k)."""
        return self.log_probs.exp().sum(-1)


def kl_divergence(teacher: TeacherTargets, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per position, ``(T,)`` float32, differentiable in ``student_logits`` (``(T, V)``).

    With top-k targets both distributions are coarse-grained to the teacher's k tokens plus "every other token"
    (when k is the vocabulary size this is the full KL, up to summation order)."""
    student = student_logits.float().log_softmax(-1)
    if teacher.ids is None:
        target, predicted = teacher.log_probs, student
    else:
        target, predicted = teacher.log_probs, student.gather(-1, teacher.ids)
        if teacher.rest is not None:
            target = torch.cat([target, teacher.rest.unsqueeze(-1)], dim=-1)
            predicted = torch.cat([predicted, _log_rest(student, teacher.ids).unsqueeze(-1)], dim=-1)
    target, predicted = target.clamp(min=_LOG_FLOOR), predicted.clamp(min=_LOG_FLOOR)
    return (target.exp() * (target - predicted)).sum(-1)


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets | None, ntp_weight: float
) -> torch.Tensor:
    """Summed NLL (float32) of ``targets`` (``(T,)``) under ``logits`` (``(T, V)``); the teacher and weight are
    unused (the signature is the one every objective shares)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets | None, ntp_weight: float
) -> torch.Tensor:
    """Summed ``KL(teacher || student)`` over the ``T`` positions, plus ``ntp_weight`` times their summed NLL."""
    if teacher is None:
        raise ValueError("distillation_loss: no teacher targets for this window")
    loss = kl_divergence(teacher, logits).sum()
    if ntp_weight:
        loss = loss + ntp_weight * next_token_loss(logits, targets, None, 0.0)
    return loss


class Objective(NamedTuple):
    """A training objective: its loss ``(logits, targets, teacher, ntp_weight) -> summed loss``, and whether it needs
    the teacher's targets for each chunk."""

    loss: Callable[[torch.Tensor, torch.Tensor, TeacherTargets | None, float], torch.Tensor]
    uses_teacher: bool


OBJECTIVES: dict[str, Objective] = {
    "ntp": Objective(next_token_loss, uses_teacher=False),
    "distill": Objective(distillation_loss, uses_teacher=True),
}


def model_positions(model: torch.nn.Module, student_tokens: int) -> int:
    """The number of positions ``model`` takes (its text config's ``max_position_embeddings``): the default teacher
    window. Raises ``ValueError`` when it is missing or shorter than the student's window, ``student_tokens``."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    positions = getattr(getattr(config, "get_text_config", lambda: config)(), "max_position_embeddings", None)
    if isinstance(positions, bool) or not (isinstance(positions, int) and positions >= student_tokens):
        raise ValueError(
            f"memorize: the model's max_position_embeddings is {positions!r}, not at least the student's window "
            f"(chunk_tokens + context_tokens = {student_tokens}): set MemorizeConfig.teacher_context_tokens"
        )
    return positions


def _log_rest(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """``(T,)``: the log of the total probability of the tokens not in ``ids`` (``None`` when there are none).
    A log-sum-exp over the remaining log-probabilities, exact even where ``1 - sum(top)`` would cancel."""
    if ids.shape[-1] >= log_probs.shape[-1]:
        return None
    return log_probs.scatter(-1, ids, -math.inf).logsumexp(-1)
