"""Test-time memorisation: write a long text into an adapter's parameters, chunk after chunk (``locas_method.md`` 4).

The protocol is TempLoRA's, which the Locas paper uses. The text is split into chunks of ``chunk_tokens``; a Locas
memory is initialised from the first chunk (``init_locas_weights``); then every chunk is first *scored* (its
next-token loss under the current memory, attention limited to ``context_tokens`` of preceding text given as a prefix
that carries no loss) and then *trained on* for ``steps_per_chunk`` AdamW steps, the memory's rows being clipped to
the unit ball after every step. Scoring before training makes the losses prequential: every token is predicted by a
memory that has not yet seen it, so the perplexity measures what the memory carries over from the past, beyond the
short attention window. The same loop trains a LoRA adapter (the TempLoRA baseline) on identical chunks and prefixes.

Training follows ``MemorizeConfig.objective``: next-token prediction on the chunk (TempLoRA's), or self-distillation
from the same model without the memory reading a long window of the text (`peft_locas.engine.objectives`). Scoring is
always the prequential next-token loss with the short window, so perplexities compare across objectives.

A conversation (`peft_locas.recall.dialogue.Conversation`) is memorised as its rendered text, and its chunks begin at
the start of a session header or a turn, so a turn's speaker is never split from what they said (`chunk_windows`).

Distributed runs (``torchrun`` or ``accelerate launch``, one process per device, CPU ``gloo`` included) keep the chunks
in order. Every rank holds the whole memory; each chunk's scored tokens are split into one contiguous share per rank,
each rank runs the prefix and chunk up to the end of its share (and, distilling, the teacher for its share), and the
ranks sum their losses and memory gradients, so every step is the single-process step (up to float summation order).
This divides the loss and backward work, not the longest forward, so it serves memory and throughput limits of large
models rather than latency. The engine does this itself and wants the unwrapped model: do not ``accelerator.prepare``
it. FSDP and DeepSpeed ZeRO are not used: the trainable memory is small (a few MB to tens of MB), so sharding it gains
nothing, and a frozen base too large for one device can be split across a process's devices with ``device_map="auto"``
or loaded in 4/8 bits instead; under ``accelerate launch`` with an FSDP or DeepSpeed config, those plugin settings are
simply not applied.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..distributed import Ranks
from ..init.data import METHODS, init_locas_weights
from ..tuner.config import LocasConfig
from .checkpointing import adapter_settings, fingerprint, load_checkpoint, save_checkpoint
from .chunking import Window, chunk_windows, is_conversation, tokens_and_boundaries
from .objectives import OBJECTIVES, TeacherTargets, model_positions, next_token_loss
from .results import MemorizeResult

if TYPE_CHECKING:
    from ..recall.dialogue import Conversation

#: optimiser settings left unset in ``MemorizeConfig``, per adapter type: the paper's GLU memory learning rate, and
#: TempLoRA's public recipe (AdamW, eps 1e-7, constant schedule after 2 warm-up steps)
RECIPES: dict[str, dict[str, float]] = {
    "locas": {"lr": 4e-3, "adam_eps": 1e-8, "warmup_steps": 0},
    "lora": {"lr": 5e-5, "adam_eps": 1e-7, "warmup_steps": 2},
}
_RUNTIME_FIELDS = ("checkpoint_dir", "checkpoint_every", "show_progress", "fused_scoring")
# settings that only shape a distillation run (left out of an NTP run's protocol, so older checkpoints still resume)
_DISTILL_FIELDS = ("objective", "teacher_context_tokens", "distill_top_k", "ntp_weight")
# settings that only shape a self-study run (left out when self_study_questions is 0, for the same reason)
_SELF_STUDY_FIELDS = ("self_study_questions", "self_study_steps")


def templora_config(r: int = 64) -> LoraConfig:
    """TempLoRA's adapter: LoRA on every linear layer except the output head, ``alpha = r``, dropout 0.05."""
    return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05, target_modules="all-linear")


@dataclass
class MemorizeConfig:
    """How `memorize()` writes a text into an adapter.

    Args:
        chunk_tokens: tokens per chunk; each chunk is scored, then trained on.
        context_tokens: preceding tokens given to each chunk as an attention prefix (no loss on it); the memory has
            to carry everything further back.
        steps_per_chunk: optimiser steps on each chunk after scoring it (0 scores only).
        objective: what each step minimises (`peft_locas.engine.objectives`): ``"ntp"``, the chunk's next-token loss, or
            ``"distill"``, the mean ``KL(teacher || student)`` of next-token distributions over the chunk's scored
            positions, where the teacher is the model without the adapter reading the chunk after a long window of
            the text (computed once per chunk, before its steps, without gradients) and the student is the model
            with the memory reading the same short window as scoring does.
        teacher_context_tokens: the teacher's window: the chunk's tokens and those before it, at most this many in
            all (so the chunk's first token sees ``teacher_context_tokens - chunk length`` tokens before it, fewer
            near the text's start). ``None``: as many as the model takes (its text config's
            ``max_position_embeddings``). Must be at least ``chunk_tokens + context_tokens``, so the teacher never
            sees less than the student.
        distill_top_k: keep the teacher's ``k`` most probable tokens per position and compute the exact KL between
            the two distributions coarse-grained to those ``k`` tokens plus "any other token" (a lower bound of the
            full KL, zero when the models agree; ``O(T k)`` teacher memory per chunk instead of ``O(T V)``);
            ``None``: the full-vocabulary KL. The default 64 keeps most of the mass where it matters: over 512
            tokens of *Pride and Prejudice*, SmolLM2-135M's top 64 tokens hold a mean 86% (median 92%, 10th
            percentile 66%) of its next-token probability (top 256: mean 94%); the rest is still matched as one
            outcome, so moving mass into or out of the tail costs, only its spread within the tail is ignored.
        ntp_weight: with ``"distill"``, the weight of the next-token loss added to the KL (0: pure distillation).
        self_study_questions: self-study (`peft_locas.engine.self_study`, after Cartridges): questions per chunk the
            base model writes about the chunk's window, answers reading it (the teacher, top ``distill_top_k``), and
            the memory is trained to answer with no context, as `peft_locas.recall.Asker` asks with
            `peft_locas.recall.memory_instruction` (a conversation's or a text's; KL on the answer tokens), after the
            chunk's regular steps; 0: off. Needs the tokenizer and a single process.
        self_study_steps: optimiser steps per chunk on its self-study questions (``None``: ``steps_per_chunk``;
            0: the questions and answers are only generated and recorded).
        lr, adam_eps, warmup_steps: AdamW learning rate, epsilon and linear warm-up (in steps, counted over the whole
            run, as transformers' constant schedule with warm-up); ``None`` takes ``RECIPES`` for the adapter type.
        weight_decay: AdamW weight decay (0: norm clipping already bounds a memory).
        init: ``init_locas_weights`` method initialising a Locas memory from the first chunk (default ``"top_k"``);
            ``None`` keeps the adapter's weights, e.g. to continue a memory. Ignored for LoRA.
        max_tokens: memorise only the first ``max_tokens`` tokens of the text (``None``: all).
        compare_baseline: also score every chunk with the adapter disabled (same prefixes, same tokens).
        seed: seeds torch before the adapter is created, so runs are repeatable.
        adapter_name: the adapter to train (and to create, when a base model is given).
        checkpoint_dir: save a resumable checkpoint here, and resume from the one found there.
        checkpoint_every: save after every this many chunks (and after the last).
        show_progress: show a progress bar with the running perplexity and tokens/s (on rank 0).
        fused_scoring: score each chunk from its first training step's forward instead of a forward of its own (the
            same parameters, prefix and tokens give the same logits, so one forward of the ``1 + 2 * steps`` forward
            and backward passes per chunk is saved; results equal the two-pass run's up to float rounding, tested).
            ``None`` (default): fused whenever it is exact, i.e. with at least one step per chunk and no dropout
            active in training (a ``Dropout`` with ``p > 0``, such as LoRA's ``lora_dropout``, or attention dropout
            in the model config), since scoring runs without dropout; ``False``: always two passes. Not part of the
            protocol: a checkpoint resumes under either.
    """

    chunk_tokens: int = 512
    context_tokens: int = 256
    steps_per_chunk: int = 2
    objective: str = "ntp"
    teacher_context_tokens: int | None = None
    distill_top_k: int | None = 64
    ntp_weight: float = 0.0
    self_study_questions: int = 0
    self_study_steps: int | None = None
    lr: float | None = None
    adam_eps: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    init: str | None = "top_k"
    max_tokens: int | None = None
    compare_baseline: bool = False
    seed: int = 0
    adapter_name: str = "default"
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 1
    show_progress: bool = False
    fused_scoring: bool | None = None

    def __post_init__(self) -> None:
        _check_int("chunk_tokens", self.chunk_tokens, minimum=2)
        _check_int("context_tokens", self.context_tokens, minimum=0)
        _check_int("steps_per_chunk", self.steps_per_chunk, minimum=0)
        _check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("self_study_questions", self.self_study_questions, minimum=0)
        for name in ("max_tokens", "warmup_steps", "self_study_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1 if name == "max_tokens" else 0)
        for name in ("lr", "adam_eps"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"MemorizeConfig: `{name}` must be a positive number or None, got {value!r}.")
        if not (self.fused_scoring is None or isinstance(self.fused_scoring, bool)):
            fused = self.fused_scoring
            raise ValueError(f"MemorizeConfig: `fused_scoring` must be True, False or None, got {fused!r}.")
        if not (_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"MemorizeConfig: `weight_decay` must be a number >= 0, got {self.weight_decay!r}.")
        if self.init is not None and self.init not in METHODS:
            raise ValueError(
                f"MemorizeConfig: unknown `init` {self.init!r}; choose one of {', '.join(METHODS)}, or None."
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"MemorizeConfig: unknown `objective` {self.objective!r}; choose one of {', '.join(OBJECTIVES)}."
            )
        if self.distill_top_k is not None:
            _check_int("distill_top_k", self.distill_top_k, minimum=1)
        if not (_is_number(self.ntp_weight) and 0 <= self.ntp_weight < math.inf):
            raise ValueError(f"MemorizeConfig: `ntp_weight` must be a number >= 0, got {self.ntp_weight!r}.")
        teacher = self.teacher_context_tokens
        if teacher is not None and not (_is_int(teacher) and teacher >= self.student_tokens):
            raise ValueError(
                "MemorizeConfig: `teacher_context_tokens` must be an integer >= chunk_tokens + context_tokens "
                f"({self.student_tokens}, the student's window) or None, got {teacher!r}."
            )

    @property
    def student_tokens(self) -> int:
        """The longest window the student reads: a chunk and its prefix."""
        return self.chunk_tokens + self.context_tokens

    @property
    def study_steps(self) -> int:
        """Self-study steps per chunk: ``self_study_steps``, else ``steps_per_chunk`` (0 without self-study)."""
        if not self.self_study_questions:
            return 0
        return self.steps_per_chunk if self.self_study_steps is None else self.self_study_steps

    def recipe(self, adapter_type: str) -> dict[str, float]:
        """Learning rate, AdamW epsilon and warm-up steps: the ones set here, else the adapter type's defaults."""
        return {
            key: default if getattr(self, key) is None else getattr(self, key)
            for key, default in RECIPES[adapter_type].items()
        }

    def protocol(self, adapter_type: str) -> dict[str, Any]:
        """Every setting that shapes the results (what a resumed run must share), optimiser defaults resolved. The
        distillation settings are part of it for ``objective="distill"`` only: they do not shape an NTP run; the
        self-study settings with ``self_study_questions > 0`` only (and then ``distill_top_k``, which its teacher
        keeps, too)."""
        skipped = _RUNTIME_FIELDS + (_DISTILL_FIELDS if self.objective == "ntp" else ())
        if not self.self_study_questions:
            skipped += _SELF_STUDY_FIELDS
        else:
            skipped = tuple(name for name in skipped if name != "distill_top_k")
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        return {**settings, **self.recipe(adapter_type)}


def memorize(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_token_ids: str | Sequence[int] | torch.Tensor | Conversation | Sequence[str | Conversation],
    config: MemorizeConfig | None = None,
    *,
    peft_config: PeftConfig | None = None,
    callback: Callable[..., None] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> MemorizeResult | list[MemorizeResult]:
    """Memorise a text into an adapter by the score-then-train protocol (see the module docstring).

    With ``adapter_names``, ``text_or_token_ids`` is a list of texts, each memorised into its own Locas adapter, all
    in one batched run (`peft_locas.engine.batched_memorization.memorize_batch`, which documents that form and returns
    one result per text); without it, a list of texts is one text of several documents.

    Args:
        model: a ``PeftModel`` with a Locas or LoRA adapter named ``config.adapter_name``, or a base model, which is
            then wrapped (in place, as ``get_peft_model`` does) with ``peft_config``.
        tokenizer: turns a text into token ids; unused (may be ``None``) when token ids are given.
        text_or_token_ids: the text, its token ids (a list or a 1-D / ``(1, n)`` tensor), or a
            `peft_locas.recall.dialogue.Conversation`: its rendered text, chunked at unit starts
            (`text_and_boundaries`, `chunk_windows`), or several such documents (texts and conversations), memorised
            in order as one text (`documents_text`: joined by a blank line, chunked at document and turn starts).
        config: the protocol's settings (default ``MemorizeConfig()``).
        peft_config: for a base model: a ``LocasConfig`` (default ``LocasConfig()``) or a ``LoraConfig`` (see
            `templora_config()`). The config object itself is not modified.
        callback: called as ``callback(chunk_index, result_so_far)`` after every chunk (after its checkpoint); with
            ``adapter_names``, as ``callback(adapter_name, chunk_index, result_so_far)``.
        adapter_names: one adapter name per text, to memorise several texts into separate memories in one run.

    Returns:
        the per-chunk results; ``result.model`` is the trained ``PeftModel``. The run is on the model's device and
        is deterministic for a given ``config.seed``; with ``checkpoint_dir`` it resumes from, and gives the same
        results as, an interrupted run.

    Raises:
        ValueError: a text shorter than one chunk, no tokenizer for a text (or for self-study), an adapter that is not
            Locas or LoRA, self-study under torch.distributed, or, when distilling with
            ``teacher_context_tokens=None``, a model whose ``max_position_embeddings`` is missing or shorter than the
            student's window.
    """
    if adapter_names is not None:
        from .batched_memorization import memorize_batch

        return memorize_batch(
            model, tokenizer, text_or_token_ids, adapter_names, config, peft_config=peft_config, callback=callback
        )
    started = time.perf_counter()
    config = config or MemorizeConfig()
    ids, unit_starts = tokens_and_boundaries(tokenizer, text_or_token_ids, config.max_tokens)
    windows = chunk_windows(len(ids), config.chunk_tokens, config.context_tokens, unit_starts)
    torch.manual_seed(config.seed)
    peft_model, adapter_config = _with_adapter(model, peft_config, config.adapter_name)
    adapter_type = "locas" if isinstance(adapter_config, LocasConfig) else "lora"
    objective = OBJECTIVES[config.objective]
    loss = functools.partial(objective.loss, ntp_weight=config.ntp_weight)
    teacher_context = 0
    if objective.uses_teacher:
        teacher_context = config.teacher_context_tokens or model_positions(peft_model, config.student_tokens)
    run_fingerprint = run_fingerprint_of(peft_model, config, adapter_config, adapter_type, ids, unit_starts)
    text = _Reader.of(peft_model, ids)
    study = None
    if config.self_study_questions:
        if tokenizer is None:
            raise ValueError(
                "memorize: self-study reads each chunk as text: pass the tokenizer, or self_study_questions=0"
            )
        if text.ranks.distributed:
            raise ValueError(
                "memorize: self-study runs in a single process: set self_study_questions=0 under torch.distributed"
            )
        from .self_study import SelfStudy

        study = SelfStudy(
            peft_model,
            tokenizer,
            config.self_study_questions,
            config.study_steps,
            config.seed,
            config.distill_top_k,
            conversation=is_conversation(text_or_token_ids),
        )
    if adapter_type == "locas" and config.init is not None:
        first = windows[0]
        init_locas_weights(
            peft_model,
            [{"input_ids": text.ids[first.start : first.end].unsqueeze(0)}],
            method=config.init,
            adapter_name=config.adapter_name,
            seed=config.seed,
            gather_distributed=False,  # every rank initialises from the whole first chunk
            show_progress_bar=False,
        )
    named = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"memorize: adapter {config.adapter_name!r} has no trainable parameter (inference mode?)")
    parameters = [p for _, p in named]
    recipe = config.recipe(adapter_type)
    optimizer = torch.optim.AdamW(parameters, lr=recipe["lr"], eps=recipe["adam_eps"], weight_decay=config.weight_decay)
    clip = functools.partial(peft_model.clip_memory_norms_, [config.adapter_name]) if adapter_type == "locas" else None
    update = _Update(optimizer, parameters, text.ranks, recipe, clip)
    checkpoint = dict(
        peft_model=peft_model,
        adapter_name=config.adapter_name,
        optimizer=optimizer,
        parameter_names=[name for name, _ in named],
        run_fingerprint=run_fingerprint,
        ranks=text.ranks,
    )
    result = MemorizeResult(
        baseline_losses=[] if config.compare_baseline else None,
        train_losses=[] if config.steps_per_chunk else None,
        self_study=[] if study is not None else None,
    )
    if config.checkpoint_dir is not None:
        restored = load_checkpoint(config.checkpoint_dir, **checkpoint)
        if restored is not None:
            result = MemorizeResult.from_dict(restored)
    done = len(result.token_counts)
    elapsed_before = result.wall_time_s
    was_training = peft_model.training
    bar = _progress_bar(windows, done, config.show_progress and text.ranks.is_main, "memorize")
    fused = fuses_scoring(peft_model, config)
    try:
        for index in range(done, len(windows)):
            window = windows[index]
            peft_model.eval()
            score, baseline = text.score(peft_model, window, config.compare_baseline, skip_adapter=fused)
            teaching = objective.uses_teacher and config.steps_per_chunk > 0
            teacher = text.teacher(peft_model, window, teacher_context, config.distill_top_k) if teaching else None
            peft_model.train()
            train_loss = torch.zeros((), device=text.ids.device)
            # the schedule's clock: every chunk takes its nominal steps (also where self-study found no question)
            update.step = index * (config.steps_per_chunk + config.study_steps)
            for step in range(config.steps_per_chunk):
                part, nll = text.backward(peft_model, window, loss, teacher)
                if fused and step == 0:  # the first step's forward is the scoring forward (before any update)
                    score = text.ranks.sum(nll) / window.scored
                train_loss += part
                update()
            mean_train_loss = text.ranks.sum(train_loss) / config.steps_per_chunk if config.steps_per_chunk else None
            studied = study.run(text.ids[window.start : window.end], index, update) if study is not None else None
            elapsed = elapsed_before + time.perf_counter() - started
            result.add_chunk(
                window.scored, score, baseline, elapsed, text.ids.device, train_loss=mean_train_loss, self_study=studied
            )
            chunks_done = index + 1
            if config.checkpoint_dir is not None and (
                chunks_done % config.checkpoint_every == 0 or chunks_done == len(windows)
            ):
                save_checkpoint(config.checkpoint_dir, chunks_done=chunks_done, result=result.to_dict(), **checkpoint)
            _show(bar, result)
            if callback is not None:
                callback(index, result)
    finally:
        bar.close()
        peft_model.train(was_training)
    result.model = peft_model
    return result


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_token_ids: str | Sequence[int] | torch.Tensor | Conversation | Sequence[str | Conversation],
    *,
    chunk_tokens: int = 512,
    context_tokens: int = 256,
    max_tokens: int | None = None,
    compare_baseline: bool = False,
    show_progress: bool = False,
) -> MemorizeResult:
    """Score a text chunk by chunk, exactly as `memorize()` does but without training: the perplexity a model
    (with its adapter, if any) reaches with only ``context_tokens`` of preceding text in view.

    ``compare_baseline`` also scores with the adapter disabled (``model`` must then be a ``PeftModel``). A
    `Conversation` is chunked at its unit starts, as `memorize()` chunks it.
    """
    started = time.perf_counter()
    if compare_baseline and not isinstance(model, PeftModel):
        raise ValueError("evaluate: compare_baseline needs a PeftModel (the baseline is the model without its adapter)")
    ids, unit_starts = tokens_and_boundaries(tokenizer, text_or_token_ids, max_tokens)
    windows = chunk_windows(len(ids), chunk_tokens, context_tokens, unit_starts)
    text = _Reader.of(model, ids)
    result = MemorizeResult(baseline_losses=[] if compare_baseline else None)
    was_training = model.training
    model.eval()
    bar = _progress_bar(windows, 0, show_progress and text.ranks.is_main, "evaluate")
    try:
        for window in windows:
            loss, baseline = text.score(model, window, compare_baseline)
            result.add_chunk(window.scored, loss, baseline, time.perf_counter() - started, text.ids.device)
            _show(bar, result)
    finally:
        bar.close()
        model.train(was_training)
    return result


@dataclass(frozen=True)
class _Reader:
    """The text's token ids on the model's device, read window by window; under torch.distributed each rank reads its
    share of a window's scored tokens and the ranks add up their NLL (and, in training, their losses and gradients).
    Scoring is always the next-token loss; training takes the objective's loss function (`OBJECTIVES`)."""

    ids: torch.Tensor
    ranks: Ranks
    keeps_logits: bool  # the model computes only the logits asked for (``logits_to_keep``)

    @classmethod
    def of(cls, model: torch.nn.Module, ids: Sequence[int]) -> _Reader:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        device = model.get_input_embeddings().weight.device
        keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        return cls(torch.tensor(ids, dtype=torch.long, device=device), Ranks.current(), keeps_logits)

    def score(
        self, model: torch.nn.Module, window: Window, baseline: bool, skip_adapter: bool = False
    ) -> tuple[float | None, float | None]:
        """Mean NLL of the window's scored tokens (``None`` when ``skip_adapter``: the first training step scores),
        and with the adapter disabled when ``baseline``; no gradients."""
        with torch.no_grad():
            loss = None if skip_adapter else self._mean(model, window)
            if not baseline:
                return loss, None
            with model.disable_adapter():
                return loss, self._mean(model, window)

    def teacher(
        self, model: torch.nn.Module, window: Window, context_tokens: int, top_k: int | None
    ) -> TeacherTargets | None:
        """The teacher's targets at this rank's share of the window's scored positions (``None`` for an empty share):
        the model with its adapter disabled, no gradients, reading the chunk's tokens after as many preceding ones as
        fit in ``context_tokens`` in all (the window start is the chunk's, so every rank's teacher is the same)."""
        share = window.share(self.ranks.rank, self.ranks.size)
        if not share.scored:
            return None
        with torch.no_grad(), model.disable_adapter():
            logits = self._logits(model, Window(max(0, window.end - context_tokens), share.first, share.end))
        return TeacherTargets.from_logits(logits, top_k)

    def backward(
        self, model: torch.nn.Module, window: Window, loss: Callable, teacher: TeacherTargets | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate this rank's part of the window's mean ``loss`` (an objective's loss, summed over positions;
        the ranks' parts sum to the mean) and return that part, detached, with this rank's summed next-token NLL
        from the same forward (what scoring computes; both 0 for an empty share)."""
        share = window.share(self.ranks.rank, self.ranks.size)
        if not share.scored:
            zero = self.ids.new_zeros((), dtype=torch.float32)
            return zero, zero
        logits, targets = self._logits(model, share), self.ids[share.first : share.end]
        part = loss(logits, targets, teacher) / window.scored
        part.backward()
        with torch.no_grad():
            nll = next_token_loss(logits.detach(), targets, None, 0.0)
        return part.detach(), nll

    def _mean(self, model: torch.nn.Module, window: Window) -> float:
        share = window.share(self.ranks.rank, self.ranks.size)
        total = self._nll(model, share) if share.scored else self.ids.new_zeros((), dtype=torch.float32)
        return self.ranks.sum(total) / window.scored

    def _nll(self, model: torch.nn.Module, window: Window) -> torch.Tensor:
        """Summed NLL (float32) of the window's scored tokens, each predicted from all input tokens before it."""
        return next_token_loss(self._logits(model, window), self.ids[window.first : window.end], None, 0.0)

    def _logits(self, model: torch.nn.Module, window: Window) -> torch.Tensor:
        """``(scored, V)``: the logits predicting each of the window's scored tokens from all input tokens before it."""
        kwargs = {"logits_to_keep": window.scored + 1} if self.keeps_logits else {}
        logits = model(input_ids=self.ids[window.start : window.end].unsqueeze(0), use_cache=False, **kwargs).logits
        return logits[0, -window.scored - 1 : -1]


@dataclass
class _Update:
    """One optimiser step of the run, on the gradients accumulated since the last: summed over the ranks, AdamW at the
    schedule's learning rate for step number ``step`` (then counted), gradients zeroed, a memory's rows clipped."""

    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    ranks: Ranks
    recipe: dict[str, float]
    clip: Callable[[], None] | None
    step: int = 0

    def __call__(self) -> None:
        self.ranks.sum_gradients_(self.parameters)
        for group in self.optimizer.param_groups:
            group["lr"] = _learning_rate(self.recipe, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.clip is not None:
            self.clip()
        self.step += 1


def run_fingerprint_of(
    peft_model: PeftModel,
    config: MemorizeConfig,
    adapter_config: PeftConfig,
    adapter_type: str,
    ids: Sequence[int],
    unit_starts: Sequence[int] | None,
) -> dict[str, Any] | None:
    """What a checkpoint of this run must match to resume it (`checkpointing.fingerprint`), ``None`` without
    ``checkpoint_dir``; the unit starts are part of it, since the same tokens chunked elsewhere are another run."""
    if config.checkpoint_dir is None:
        return None
    protocol = config.protocol(adapter_type)
    if unit_starts is not None:
        protocol["unit_starts_sha256"] = hashlib.sha256(json.dumps(list(unit_starts)).encode()).hexdigest()
    return fingerprint(peft_model, adapter_settings(adapter_config), protocol, ids)


def fuses_scoring(model: torch.nn.Module, config: MemorizeConfig) -> bool:
    """Whether `memorize()` scores each chunk from its first training step's forward (``config.fused_scoring``;
    ``None``: when that forward is exact, i.e. at least one step per chunk and no dropout active in training)."""
    if config.steps_per_chunk == 0 or config.fused_scoring is False:
        return False
    return bool(config.fused_scoring) or not has_dropout(model)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training mode changes the model's forward through dropout: a ``Dropout`` module with ``p > 0`` (LoRA's
    ``lora_dropout``, GPT-2's residual dropout...) or an attention dropout probability in its (text) config."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(base, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    keys = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
    return any(isinstance(getattr(config, key, 0), float) and getattr(config, key) > 0 for key in keys)


def _learning_rate(recipe: dict[str, float], step: int) -> float:
    """Constant after a linear warm-up from 0, as transformers' ``get_constant_schedule_with_warmup`` (TempLoRA's)."""
    warmup = recipe["warmup_steps"]
    return recipe["lr"] * min(1.0, step / warmup) if warmup else recipe["lr"]


def _with_adapter(
    model: torch.nn.Module, peft_config: PeftConfig | None, adapter_name: str
) -> tuple[PeftModel, PeftConfig]:
    """The ``PeftModel`` to train and its adapter's config as given (before any data initialisation changes it)."""
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("memorize: the model already is a PeftModel; pass either it or a base model + peft_config")
        adapter_config = model.peft_config.get(adapter_name)
        if not isinstance(adapter_config, (LocasConfig, LoraConfig)):
            raise ValueError(f"memorize: the model has no Locas or LoRA adapter named {adapter_name!r}")
        model.set_adapter(adapter_name)
        return model, copy.deepcopy(adapter_config)
    peft_config = LocasConfig() if peft_config is None else peft_config
    if not isinstance(peft_config, (LocasConfig, LoraConfig)):
        raise ValueError(f"memorize: trains Locas or LoRA adapters, got a {type(peft_config).__name__}")
    return get_peft_model(model, copy.deepcopy(peft_config), adapter_name=adapter_name), peft_config


def _progress_bar(windows: Sequence[Window], done: int, enabled: bool, desc: str) -> tqdm:
    total = sum(w.scored for w in windows)
    initial = sum(w.scored for w in windows[:done])
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True
    )


def _show(bar: tqdm, result: MemorizeResult) -> None:
    postfix = {"ppl": f"{result.perplexity:.2f}"}
    if result.baseline_losses is not None:
        postfix["no-memory ppl"] = f"{result.baseline_perplexity:.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(result.token_counts[-1])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not (_is_int(value) and value >= minimum):
        raise ValueError(f"MemorizeConfig: `{name}` must be an integer >= {minimum}, got {value!r}.")
