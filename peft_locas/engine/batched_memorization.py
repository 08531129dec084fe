"""Several texts memorised side by side, each into its own Locas memory, in one run (one memory per book, per user).

`memorize()` with ``adapter_names`` lands here. Every text gets its own adapter (the same ``LocasConfig``), its own
data-driven initialisation from its first chunk and its own AdamW state. Each round, every text with chunks left
contributes its next window as one row of a batch: rows are right-padded to the longest (causal attention, so a row's
tokens never attend to the padding after them: no attention mask is needed and a row's logits are those of the
unpadded window), and `LocasModel.routing` sends row ``b`` through memory ``b`` in the forward and the backward, the
memories running stacked (`peft_locas.weights.memory.stacked_output`). The training loss is the sum over rows of each
row's mean loss; the memories share no parameter, so each one's gradient is exactly its own text's. Then every memory
takes its own optimiser step and clips its own rows. A text that ends drops out of later rounds. Distillation teachers
are computed one text at a time (a teacher reads up to the model's whole window; batching them would multiply that peak
by the number of texts).

So each memory, its losses and its checkpoints are those of a separate single-text `memorize()` run with the same
config (up to float summation order in batched matmuls; tested), while the frozen base model runs once per round for
all texts instead of once per text. The protocol and its defaults are `memorize()`'s (`MemorizeConfig`); the
checkpoint directory holds one subfolder per adapter, each a single-text run's checkpoint, so a killed batch resumes
every memory from its own last chunk.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..distributed import Ranks
from ..init.data import init_locas_weights
from ..tuner.config import LocasConfig
from ..tuner.registration import LOCAS_PREFIX
from .checkpointing import load_checkpoint, save_checkpoint
from .chunking import Window, chunk_windows, tokens_and_boundaries
from .memorization import MemorizeConfig, _Reader, _Update, fuses_scoring, run_fingerprint_of
from .objectives import OBJECTIVES, TeacherTargets, model_positions, next_token_loss
from .results import MemorizeResult

#: the batch's padding id: any valid token works, since padding only ever follows a row's tokens (causal attention)
_PAD = 0


@dataclass
class _Text:
    """One text of the batch: its tokens, windows, adapter, optimiser step and results so far."""

    name: str
    reader: _Reader
    windows: list[Window]
    update: _Update
    checkpoint: dict[str, Any]
    result: MemorizeResult

    @property
    def done(self) -> int:
        return len(self.result.token_counts)


def memorize_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[Any],
    adapter_names: Sequence[str],
    config: MemorizeConfig | None = None,
    *,
    peft_config: PeftConfig | None = None,
    callback: Callable[[str, int, MemorizeResult], None] | None = None,
) -> list[MemorizeResult]:
    """Memorise ``texts[b]`` into adapter ``adapter_names[b]``, all in one batched run (see the module docstring).

    Args:
        model: a base model, wrapped in place with one ``peft_config`` adapter (default ``LocasConfig()``) per name,
            each created after seeding torch with ``config.seed`` (so each starts as a single-text run's would); or a
            ``PeftModel`` holding a Locas adapter under every name (with ``config.init=None`` they are continued).
        tokenizer: turns texts into token ids; unused (may be ``None``) when every text is token ids.
        texts: one entry per memory, each what `memorize()` takes: a text, token ids, a ``Conversation``, or a list
            of documents memorised as one text. Lengths may differ.
        adapter_names: one distinct adapter name per text.
        config: `memorize()`'s settings; ``adapter_name`` is ignored (the names are ``adapter_names``) and
            ``checkpoint_dir`` gets one subfolder per adapter, named after it.
        peft_config: for a base model, a ``LocasConfig``.
        callback: called as ``callback(adapter_name, chunk_index, result_so_far)`` after each text's chunk.

    Returns:
        one `MemorizeResult` per text, in order, each equal (up to float rounding) to a single-text `memorize()` run's;
        ``wall_time_s`` is the batch's time so far (so ``tokens_per_s`` is the text's share), ``model`` the shared
        ``PeftModel``.

    Raises:
        ValueError: names that are not one distinct non-empty string per text, or a name PEFT would misread
            (``"__base__"``, one with ``.``, ``/`` or ``\\``, one inside the ``"locas_"`` prefix); a text shorter
            than one chunk (naming which); a LoRA adapter or config (LoRA adapters are memorised one text at a
            time); self-study or torch.distributed (single-text runs only); or any error `memorize()` raises for its
            settings.
    """
    started = time.perf_counter()
    config = config or MemorizeConfig()
    names = _check_names(texts, adapter_names)
    if config.self_study_questions:
        raise ValueError("memorize: self-study runs one text at a time: set self_study_questions=0 to memorise several")
    ranks = Ranks.current()
    if ranks.distributed:
        raise ValueError("memorize: several texts are memorised in a single process: run one text per torchrun job")
    tokenized = [tokens_and_boundaries(tokenizer, text, config.max_tokens) for text in texts]
    windows = []
    for index, (name, (ids, starts)) in enumerate(zip(names, tokenized, strict=True)):
        try:
            windows.append(chunk_windows(len(ids), config.chunk_tokens, config.context_tokens, starts))
        except ValueError as exc:  # which of the texts
            raise ValueError(f"memorize: text {index} (adapter {name!r}): {exc}") from exc
    peft_model, adapter_config = _with_adapters(model, peft_config, names, config.seed)
    objective = OBJECTIVES[config.objective]
    loss = functools.partial(objective.loss, ntp_weight=config.ntp_weight)
    teacher_context = 0
    if objective.uses_teacher:
        teacher_context = config.teacher_context_tokens or model_positions(peft_model, config.student_tokens)
    batch = []
    for name, (ids, starts), text_windows in zip(names, tokenized, windows, strict=True):
        reader = _Reader.of(peft_model, ids)
        if config.init is not None:
            first = text_windows[0]
            init_locas_weights(
                peft_model,
                [{"input_ids": reader.ids[first.start : first.end].unsqueeze(0)}],
                method=config.init,
                adapter_name=name,
                seed=config.seed,
                gather_distributed=False,
                show_progress_bar=False,
            )
        batch.append((name, ids, starts, reader, text_windows))
    _make_trainable(peft_model, names)  # before the optimisers collect their parameters
    texts_state = [_text_state(peft_model, config, adapter_config, ranks, *entry) for entry in batch]
    elapsed_before = max(text.result.wall_time_s for text in texts_state)
    fused = fuses_scoring(peft_model, config)  # walks every module: once per run, not per round
    was_training = peft_model.training
    total = sum(w.scored for text in texts_state for w in text.windows)
    initial = sum(w.scored for text in texts_state for w in text.windows[: text.done])
    bar = tqdm(
        total=total,
        initial=initial,
        disable=not config.show_progress,
        desc=f"memorize x{len(names)}",
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
    )
    try:
        while rows := [text for text in texts_state if text.done < len(text.windows)]:
            measured = _round(peft_model, rows, config, loss, teacher_context, objective.uses_teacher, fused)
            elapsed = elapsed_before + time.perf_counter() - started
            for text, (score, baseline, train_loss) in zip(rows, measured, strict=True):
                window = text.windows[text.done]
                text.result.add_chunk(
                    window.scored, score, baseline, elapsed, text.reader.ids.device, train_loss=train_loss
                )
                chunks_done = text.done
                if config.checkpoint_dir is not None and (
                    chunks_done % config.checkpoint_every == 0 or chunks_done == len(text.windows)
                ):
                    save_checkpoint(
                        Path(config.checkpoint_dir) / text.name,
                        chunks_done=chunks_done,
                        result=text.result.to_dict(),
                        **text.checkpoint,
                    )
                bar.set_postfix({"ppl": _perplexities(texts_state)}, refresh=False)
                bar.update(window.scored)
                if callback is not None:
                    callback(text.name, chunks_done - 1, text.result)
    finally:
        bar.close()
        peft_model.train(was_training)
    for text in texts_state:
        text.result.model = peft_model
    return [text.result for text in texts_state]


def _round(
    model: PeftModel,
    rows: list[_Text],
    config: MemorizeConfig,
    loss: Callable,
    teacher_context: int,
    uses_teacher: bool,
    fused: bool,
) -> list[tuple[float, float | None, float | None]]:
    """One chunk of every row's text: score (and the baseline), the teachers, then ``steps_per_chunk`` steps;
    returns ``(score, baseline, mean train loss)`` per row."""
    names = [text.name for text in rows]
    windows = [text.windows[text.done] for text in rows]
    model.eval()
    scores: list[float] = []
    with torch.no_grad():
        if not fused:  # else the first training step's forward scores (see `MemorizeConfig.fused_scoring`)
            with model.base_model.routing(names):
                scores = _mean_nlls(_logits(model, rows, windows), rows, windows)
        baselines: list[float | None] = [None] * len(rows)
        if config.compare_baseline:
            with model.disable_adapter():
                baselines = _mean_nlls(_logits(model, rows, windows), rows, windows)
    teachers: list[TeacherTargets | None] = [None] * len(rows)
    if uses_teacher and config.steps_per_chunk > 0:
        teachers = [
            text.reader.teacher(model, w, teacher_context, config.distill_top_k)
            for text, w in zip(rows, windows, strict=True)
        ]
    # leaving `disable_adapter()` (baseline, teachers) leaves only the active adapter trainable
    _make_trainable(model, names)
    model.train()
    train_losses = torch.zeros(len(rows))
    for text in rows:  # the schedule's clock: the chunk index, as in a single-text run
        text.update.step = text.done * config.steps_per_chunk
    for step in range(config.steps_per_chunk):
        with model.base_model.routing(names):
            logits = _logits(model, rows, windows)
            parts = [
                loss(row_logits, text.reader.ids[w.first : w.end], teacher) / w.scored
                for row_logits, text, w, teacher in zip(logits, rows, windows, teachers, strict=True)
            ]
        torch.stack(parts).sum().backward()
        if fused and step == 0:
            with torch.no_grad():
                scores = _mean_nlls([row_logits.detach() for row_logits in logits], rows, windows)
        train_losses += torch.stack([part.detach().cpu() for part in parts])
        for text in rows:
            text.update()
    mean_train = [float(v) / config.steps_per_chunk if config.steps_per_chunk else None for v in train_losses]
    return list(zip(scores, baselines, mean_train, strict=True))


def _logits(model: PeftModel, rows: list[_Text], windows: list[Window]) -> list[torch.Tensor]:
    """Per row, ``(scored, V)``: the logits predicting its window's scored tokens, from one padded batch forward."""
    lengths = [w.end - w.start for w in windows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), _PAD, dtype=torch.long, device=rows[0].reader.ids.device)
    for b, (text, w) in enumerate(zip(rows, windows, strict=True)):
        input_ids[b, : lengths[b]] = text.reader.ids[w.start : w.end]
    # logits from the earliest position any row needs (the one predicting its first scored token) to the end
    keep = width - min(w.first - w.start for w in windows) + 1
    kwargs = {"logits_to_keep": keep} if rows[0].reader.keeps_logits else {}
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    shift = logits.shape[1] - width  # padded position p is logits index p + shift
    return [logits[b, w.first - w.start - 1 + shift : w.end - w.start - 1 + shift] for b, w in enumerate(windows)]


def _mean_nlls(logits: list[torch.Tensor], rows: list[_Text], windows: list[Window]) -> list[float]:
    """Each row's mean next-token NLL over its window's scored tokens."""
    return [
        float(next_token_loss(row_logits, text.reader.ids[w.first : w.end], None, 0.0)) / w.scored
        for row_logits, text, w in zip(logits, rows, windows, strict=True)
    ]


def _text_state(
    peft_model: PeftModel,
    config: MemorizeConfig,
    adapter_config: PeftConfig,
    ranks: Ranks,
    name: str,
    ids: list[int],
    starts: list[int] | None,
    reader: _Reader,
    windows: list[Window],
) -> _Text:
    """A text's optimiser, update and checkpoint settings, exactly those of a single-text run of adapter ``name``
    (so each checkpoint subfolder is that run's checkpoint), restored from its checkpoint when there is one."""
    named = [(key, p) for key, p in peft_model.named_parameters() if p.requires_grad and _belongs(key, name)]
    parameters = [p for _, p in named]
    recipe = config.recipe("locas")
    optimizer = torch.optim.AdamW(parameters, lr=recipe["lr"], eps=recipe["adam_eps"], weight_decay=config.weight_decay)
    clip = functools.partial(peft_model.clip_memory_norms_, [name])
    single_run = dataclasses.replace(config, adapter_name=name)  # each checkpoint is that single-text run's
    run_fingerprint = run_fingerprint_of(peft_model, single_run, adapter_config, "locas", ids, starts)
    checkpoint = dict(
        peft_model=peft_model,
        adapter_name=name,
        optimizer=optimizer,
        parameter_names=[key for key, _ in named],
        run_fingerprint=run_fingerprint,
        ranks=ranks,
    )
    result = MemorizeResult(
        baseline_losses=[] if config.compare_baseline else None,
        train_losses=[] if config.steps_per_chunk else None,
    )
    if config.checkpoint_dir is not None:
        restored = load_checkpoint(Path(config.checkpoint_dir) / name, **checkpoint)
        if restored is not None:
            result = MemorizeResult.from_dict(restored)
    return _Text(name, reader, windows, _Update(optimizer, parameters, ranks, recipe, clip), checkpoint, result)


def _with_adapters(
    model: torch.nn.Module, peft_config: PeftConfig | None, names: list[str], seed: int
) -> tuple[PeftModel, PeftConfig]:
    """The ``PeftModel`` holding a Locas adapter per name, and their config as given."""
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("memorize: the model already is a PeftModel; pass either it or a base model + peft_config")
        configs = [model.peft_config.get(name) for name in names]
        missing = [name for name, config in zip(names, configs, strict=True) if not isinstance(config, LocasConfig)]
        if missing:
            raise ValueError(
                f"memorize: the model has no Locas adapter named {', '.join(map(repr, missing))} (several texts are "
                "memorised into Locas memories; LoRA adapters one text at a time)"
            )
        return model, copy.deepcopy(configs[0])
    peft_config = LocasConfig() if peft_config is None else peft_config
    if not isinstance(peft_config, LocasConfig):
        raise ValueError(
            f"memorize: several texts are memorised into Locas memories, got a {type(peft_config).__name__} "
            "(memorise LoRA adapters one text at a time)"
        )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, copy.deepcopy(peft_config), adapter_name=names[0])
    for name in names[1:]:
        torch.manual_seed(seed)  # each memory starts as a single-text run's would
        peft_model.add_adapter(name, copy.deepcopy(peft_config))
    return peft_model, peft_config


def _make_trainable(peft_model: PeftModel, names: list[str]) -> None:
    """Every named adapter's parameters trainable, as the active one's are in a single-text run (PEFT keeps only the
    active adapter trainable; the routed rows ignore which adapter is active)."""
    for key, parameter in peft_model.named_parameters():
        if any(_belongs(key, name) for name in names):
            parameter.requires_grad_(True)


def _belongs(parameter_name: str, adapter_name: str) -> bool:
    """Whether a ``named_parameters`` key is one of the adapter's: its memory, or its copy of a module to save."""
    return f"locas_memory.{adapter_name}." in parameter_name or f"modules_to_save.{adapter_name}." in parameter_name


def _perplexities(texts: list[_Text]) -> str:
    """The progress bar's prequential perplexity so far of each text (the first four, then their mean)."""
    values = [text.result.perplexity for text in texts if text.done]
    shown = " ".join(f"{value:.2f}" for value in values[:4])
    return shown if len(values) <= 4 else f"{shown} ... (mean {sum(values) / len(values):.2f})"


def _check_names(texts: Sequence[Any], adapter_names: Sequence[str]) -> list[str]:
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
    if names is None or not all(isinstance(name, str) and name for name in names):
        raise ValueError("memorize: `adapter_names` must be a list of non-empty adapter names, one per text")
    for name in names:
        if why := _unusable(name):
            raise ValueError(f"memorize: adapter name {name!r} cannot be used: {why}")
    if not isinstance(texts, (list, tuple)) or len(texts) != len(names):
        count = len(texts) if isinstance(texts, (list, tuple)) else "not a list of"
        raise ValueError(f"memorize: {len(names)} adapter names for {count} texts: give one name per text")
    if len(set(names)) != len(names):
        raise ValueError(f"memorize: adapter names must be distinct, got {names}")
    return names


def _unusable(name: str) -> str | None:
    """Why ``name`` cannot name one of several memories (None if it can)."""
    if name == "__base__":
        return "PEFT's per-sample `adapter_names` reads it as no adapter at all"
    if any(character in name for character in "./\\"):
        return "'.' cannot appear in a module name, and '/' or '\\' would save the adapter into a subfolder"
    if name in LOCAS_PREFIX:
        return f"it is contained in the parameters' prefix {LOCAS_PREFIX!r}, so PEFT could reinitialise it on loading"
    return None
