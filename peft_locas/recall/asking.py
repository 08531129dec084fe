"""Asking a (memorised) causal LM questions, with a shared context prefilled once and its KV cache reused.

An `Asker` builds one prompt form for every question: an optional system prompt, the context (when given), an
instruction, then ``Question: {question}``. The part before the question (the *prefix*, context included) is tokenised
once and run through the model once; each question then only runs its own tokens (the question and, with a chat
template, the assistant header) on a copy of that prefix's cache, so a long context is never recomputed.

Prompt forms (the question text is stripped first):

* with the tokenizer's chat template (used when it has one, unless ``use_chat_template=False``): the messages are an
  optional ``system`` message and one ``user`` message ``"{context}\\n\\n{instruction}\\n\\nQuestion: {question}"``
  (``"{instruction}\\n\\nQuestion: {question}"`` without a context), rendered with ``add_generation_prompt=True``;
* without it, plain text: ``"{system_prompt}\\n\\n{context}\\n\\n{instruction}\\n\\nQuestion: {question}\\nAnswer:"``
  (absent parts and their blank lines left out). A gold answer then follows after one space, as a model writes it.

The context's trailing whitespace is dropped (e.g. a text file's final newline).

The instruction follows LoCoMo's question-answering prompt (snap-research/LoCoMo, ``task_eval/gpt_utils.py``,
``QA_PROMPT``): `CONTEXT_INSTRUCTION` when a context is given; `MEMORY_INSTRUCTION`, the same request addressed to a
model that has memorised the conversation instead of reading it, when none is; `TEXT_MEMORY_INSTRUCTION` (pass it as
``instruction``, or take `memory_instruction`) for a memorised text that is not a conversation. LoCoMo's per-category
question edits (dates for temporal questions, the two-option form of adversarial ones) are the caller's, as they
change the question.

The prefix and the question's part are tokenised separately and concatenated (the prefix with the tokenizer's special
tokens in the plain form, as ``tokenizer(text)`` adds them; the chat template's own in the chat form), so a question
sees exactly the same token ids whether or not the cache is used. Decoding is greedy; answers stop at an end-of-sequence
id (the tokenizer's and the generation config's) or after ``max_new_tokens``.

Batches (`Asker.ask_many()`, `Asker.answer_logprobs()`): several questions share one prefill. Each question's
tokens continue the one prefix cache (with ``sdpa`` attention the prefix is kept once and every row's attention reads
it in one matrix product, `peft_locas.recall.attention`; with another attention it is repeated along the batch
dimension), each question's tokens are left-padded to the longest (the pads sit between the
prefix and the question, masked out by the attention mask, and the position ids continue from the prefix without
counting them), so every row computes what it computes alone (up to float rounding); a batch then decodes one token for
all its rows per forward, matrix-matrix instead of matrix-vector products. Rows that reached an end-of-sequence id
leave the batch.

Adapters: the model may be a ``PeftModel`` (any active adapter), a merged model or a plain one. Inside
``with model.disable_adapter():`` the asker answers as the base model: prefix caches are kept per model state (device,
dtype, the PEFT layers' active / disabled / merged adapters, and the parameters' in-place version counters), so a
changed state, or weights trained further, get their own prefill; the last two states' caches are kept.

Continuations: a *continuation* is the token ids that follow the shared prefix (`Asker.continuation_ids()`: a
question, after earlier ``turns`` in a chat). `Asker.continue_from()` decodes after one token by token and returns the
logits too, with greedy or caller-chosen tokens; `PrefixCache` is the same for any prefix (self-study's question
writer). `accepts_argument()`, `cache_argument()`, `max_positions()` and `end_of_sequence_ids()` answer what they need
to know of a model.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from .attention import CopiedPrefixLayer, SharedPrefixLayer, grouped_query_attention, shares_prefix
from .prefix_cache import (
    Continuation,
    PrefixCache,
    accepts_argument,
    cache_argument,
    end_of_sequence_ids,
    evaluating,
    logits_to_keep,
    max_positions,
    model_device,
)
from .prompts import CONTEXT_INSTRUCTION, MEMORY_INSTRUCTION, TEXT_MEMORY_INSTRUCTION, fit_context, memory_instruction

# what this module has always offered, now defined beside it (`prompts`, `prefix_cache`)
__all__ = [
    "CONTEXT_INSTRUCTION",
    "MEMORY_INSTRUCTION",
    "TEXT_MEMORY_INSTRUCTION",
    "Answer",
    "Asker",
    "Chat",
    "Continuation",
    "PrefixCache",
    "accepts_argument",
    "cache_argument",
    "end_of_sequence_ids",
    "fit_context",
    "max_positions",
    "memory_instruction",
]

#: generation-config settings that make ``generate`` process the logits, with their values that do not: a model with
#: another value is asked one question at a time (``generate`` applies them; the batched loop takes the plain argmax)
_PROCESSOR_SETTINGS: dict[str, tuple[Any, ...]] = {
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "stop_strings": (None,),
}
# stands for the question while the prompt is split into prefix and suffix; never part of a real prompt
_SENTINEL = "\x00LOCAS-QUESTION\x00"


@dataclass(frozen=True)
class Answer:
    """One answer: ``text`` is the decoded greedy continuation, stripped, without the end-of-sequence token.

    ``prompt_tokens`` counts the whole prompt (prefix and question part); ``new_tokens`` the generated tokens, a
    stopping end-of-sequence token included; ``seconds`` the wall time of this question (the shared prefix's one-time
    prefill excluded).
    """

    question: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


class Asker:
    """Asks ``model`` questions about ``context`` (or about what it memorised, with ``context=None``).

    Args:
        model: a causal LM (``PeftModel``, merged or plain ``transformers`` model) on any device.
        tokenizer: its tokenizer.
        context: text put before every question (e.g. a rendered conversation); ``None`` asks from memory.
        instruction: the request before each question; ``None`` takes `CONTEXT_INSTRUCTION` with a context and
            `MEMORY_INSTRUCTION` without one (for a memorised text that is not a conversation, pass
            `TEXT_MEMORY_INSTRUCTION`).
        system_prompt: an optional system message (the first paragraph of a plain prompt).
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
        max_new_tokens: default answer length limit, in tokens.
        max_context_tokens: keep only the context's last this many tokens (see `fit_context()`).

    Raises:
        ValueError: a chat template asked for and missing, or one that does not keep the question verbatim; a bad
            ``max_new_tokens``; a prompt prefix longer than the model's positions (set ``max_context_tokens``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        context: str | None = None,
        *,
        instruction: str | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        max_new_tokens: int = 64,
        max_context_tokens: int | None = None,
    ) -> None:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise ValueError("Asker: the tokenizer has no chat template; pass use_chat_template=False or set one.")
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        if context is not None and max_context_tokens is not None:
            context = fit_context(tokenizer, context, max_context_tokens)
        self.context = context
        self.instruction = instruction or (MEMORY_INSTRUCTION if context is None else CONTEXT_INSTRUCTION)
        self.system_prompt = system_prompt
        self.max_new_tokens = _check_max_new_tokens(max_new_tokens)

        rendered = self._render((), _SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError(
                "Asker: the chat template does not keep the question verbatim; use use_chat_template=False."
            )
        # trailing spaces go with the question, so it tokenises as in running text (" What", not " " + "What")
        self.prefix_text = rendered[: rendered.index(_SENTINEL)].rstrip(" ")
        encoded = tokenizer(self.prefix_text, add_special_tokens=not self.use_chat_template)["input_ids"]
        #: the shared prefix's token ids, int64 of shape ``(prefix_tokens,)``, on the CPU
        self.prefix_ids = torch.tensor(encoded, dtype=torch.long)
        #: the model's positions (`max_positions()`), ``None`` when its config names none
        self.max_positions = max_positions(model)
        if self.max_positions is not None and len(self.prefix_ids) >= self.max_positions:
            raise ValueError(
                f"Asker: the prompt prefix has {len(self.prefix_ids)} tokens but the model has {self.max_positions} "
                "positions; pass max_context_tokens to keep only the end of the context."
            )
        #: the ids an answer stops at (`end_of_sequence_ids()`)
        self.eos_token_ids = end_of_sequence_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_token_id = pad if pad is not None else (self.eos_token_ids or [0])[0]
        self._cache_kwarg = cache_argument(model)
        self._prefix = PrefixCache(model, self.prefix_ids)

    # ------------------------------------------------------------------ prompts
    def prompt(self, question: str, *, turns: Sequence[tuple[str, str]] = ()) -> str:
        """The whole prompt text for ``question`` (the prefix, then the question's part), after the earlier
        ``(question, answer)`` ``turns`` of a chat (see `Chat`).

        Raises:
            ValueError: an empty question, or ``turns`` that are not pairs of strings.
        """
        return self.prefix_text + self._continuation_text(_check_turns(turns), _check_question(question))

    def prompt_ids(self, question: str, *, turns: Sequence[tuple[str, str]] = ()) -> torch.Tensor:
        """The prompt's token ids as the model sees them: int64 of shape ``(1, prompt_tokens)``, on the CPU: the
        prefix's, then `continuation_ids()`.

        Raises:
            ValueError: as `prompt()`.
        """
        return torch.cat([self.prefix_ids, self.continuation_ids(question, turns=turns)])[None]

    def continuation_ids(self, question: str, *, turns: Sequence[tuple[str, str]] = ()) -> torch.Tensor:
        """The token ids after the shared prefix for ``question`` (after the earlier ``turns``): int64 of shape
        ``(continuation_tokens,)``, on the CPU; what each question runs through the model beyond the prefix.

        Raises:
            ValueError: as `prompt()`.
        """
        return self._continuation_ids(_check_turns(turns), _check_question(question))

    # ------------------------------------------------------------------ asking
    def prefill(self) -> None:
        """Run the shared prefix (system prompt, context, instruction) through the model now, for its current state
        (adapters, weights): otherwise the first question does it. E.g. to time it apart, or so that the first answer
        starts at once."""
        with self._asking():
            self._prefilled()

    def ask(self, question: str, *, max_new_tokens: int | None = None, turns: Sequence[tuple[str, str]] = ()) -> Answer:
        """The greedy answer to ``question`` (after the earlier ``(question, answer)`` ``turns`` of a chat, see
        `Chat`), continuing from the prefilled prefix.

        Raises:
            ValueError: an empty question, ``turns`` that are not pairs of strings, or a prompt plus answer longer
                than the model's positions.
        """
        return self._ask(_check_turns(turns), _check_question(question), max_new_tokens)

    def ask_many(
        self, questions: Sequence[str], *, max_new_tokens: int | None = None, batch_size: int = 8
    ) -> list[Answer]:
        """The greedy answers to ``questions``, in their order, computed in batches of up to ``batch_size`` questions
        that share the prefilled prefix (see the module's notes): each answer is `ask()`'s.

        Equality with `ask()`: the same token ids, up to float rounding. A batched matrix product may round the last
        bit differently from the one-row product `ask()` runs (CPU BLAS picks its kernel by the number of rows), so
        logits differ by about 1e-7 (float32) and a greedy choice could only differ where two tokens' logits tie to
        that precision. Models whose generation config asks for logits processors (``suppress_tokens``,
        ``no_repeat_ngram_size``...), whose forward takes no ``position_ids``, or whose cache has sliding-window
        layers (Mistral, Gemma 2/3) are asked one question at a time.

        ``Answer.seconds`` is the batch's wall time shared equally by its questions (their sum is the total time).

        Memory: with ``sdpa`` attention (``transformers``' default; torch >= 2.5) a batch keeps the prefix's KV cache
        once and each question only its own tokens'. With another attention implementation each question holds its own
        copy of the prefix's cache, ``2 x layers x kv_heads x head_dim x tokens`` values (4 bytes each in float32):
        with the kept one, ``batch_size + 1`` copies. SmolLM2-135M (30 layers, 3 KV heads of 64) keeps 46 KB per token
        in float32, 0.38 GB for an 8K-token prefix: ``batch_size=8`` then needs about 3.4 GB.

        Raises:
            ValueError: an empty question, a prompt plus answer longer than the model's positions, or a
                ``batch_size`` that is not a positive integer (checked for every question before any is answered).
        """
        batch_size = _check_batch_size(batch_size)
        questions = [_check_question(question) for question in questions]
        continuations = [self._continuation_ids((), question) for question in questions]
        limits = [self._limit(continuation, max_new_tokens) for continuation in continuations]
        answers = []
        with self._asking():
            prefilled = self._prefilled()  # a first prefill is not the questions' time
            if not self._can_batch(prefilled, greedy=True):
                return [self._ask((), question, max_new_tokens) for question in questions]
            for first in range(0, len(questions), batch_size):
                batch = slice(first, first + batch_size)
                start = time.perf_counter()
                new_ids = self._generate_many(continuations[batch], limits[batch], prefilled)
                seconds = (time.perf_counter() - start) / len(new_ids)
                for question, continuation, ids in zip(questions[batch], continuations[batch], new_ids, strict=True):
                    answers.append(
                        Answer(
                            question=question,
                            text=self._decode(ids).strip(),
                            prompt_tokens=len(self.prefix_ids) + len(continuation),
                            new_tokens=len(ids),
                            seconds=seconds,
                        )
                    )
        return answers

    def stream(
        self, question: str, *, max_new_tokens: int | None = None, turns: Sequence[tuple[str, str]] = ()
    ) -> Iterator[str]:
        """The greedy answer's text in pieces, as they are decoded; their concatenation is `ask()`'s text unstripped
        (with the same ``turns``).

        Generation runs in a thread; closing the iterator early stops it. A piece never ends inside a multi-byte
        character (held back until its last byte's token arrives).

        Raises:
            ValueError: as `ask()` (at this call, not at the first piece).
        """
        continuation = self._continuation_ids(_check_turns(turns), _check_question(question))
        limit = self._limit(continuation, max_new_tokens)
        return self._stream(continuation, limit)

    def continue_from(
        self,
        continuation: torch.Tensor,
        *,
        max_new_tokens: int | None = None,
        pick: Callable[[torch.Tensor], int] | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> Continuation:
        """Decode after the prefilled prefix and ``continuation`` (int64 ``(n,)``, e.g. `continuation_ids()`), one
        token at a time (`PrefixCache.decode()`), returning the new ids and the logits that chose them: the
        lower-level form of `ask()`, for callers that score or choose the tokens themselves (self-study's teacher).

        Greedy by default (`ask()`'s token ids, up to float rounding); ``pick(logits (vocab,)) -> id`` chooses
        otherwise. Decoding stops after one of `eos_token_ids` (kept), once ``stop(new ids so far)`` is true, after
        ``max_new_tokens`` (default: the asker's) or at the model's last position: unlike `ask()`, a prompt near the
        end of the model's positions gets a shorter continuation instead of an error.

        Raises:
            ValueError: an empty ``continuation``, or ``max_new_tokens`` that is not a positive integer.
        """
        limit = self.max_new_tokens if max_new_tokens is None else _check_max_new_tokens(max_new_tokens)
        return self._prefix.decode(continuation, limit, eos_token_ids=self.eos_token_ids, pick=pick, stop=stop)

    def answer_logprob(self, question: str, answer: str) -> tuple[float, int]:
        """The summed log-probability (natural log, computed in float32) of ``answer`` after ``question``'s prompt,
        and its token count: the benchmark's gold log-likelihood.

        The answer is teacher-forced as the model's reply, tokenised as it would be generated: right after the chat
        template's assistant header, or after ``"Answer:"`` with its leading space in the plain form. No
        end-of-sequence token is scored.

        Raises:
            ValueError: an empty question or answer.
        """
        continuation = self._continuation_ids((), _check_question(question))
        if not answer.strip():
            raise ValueError("Asker.answer_logprob: the answer is empty; pass the gold answer text.")
        lead = "" if self.use_chat_template else " "
        answer_ids = self._encode(lead + answer.strip())
        logits = self._continuation_logits(torch.cat([continuation, answer_ids]))
        predicting = logits[len(continuation) - 1 : -1].float().log_softmax(-1)
        picked = predicting.gather(-1, answer_ids.to(predicting.device)[:, None])
        return picked.sum().item(), len(answer_ids)

    def answer_logprobs(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> list[tuple[float, int]]:
        """`answer_logprob()` of each ``(question, answer)`` pair, in their order, computed in batches of up to
        ``batch_size`` pairs that share the prefilled prefix (left-padded as in `ask_many()`, whose memory rule of
        thumb applies); equal to `answer_logprob()` up to float rounding (a relative 1e-7 in float32, the answer's
        tokens summed).

        Raises:
            ValueError: an empty question or answer, or a ``batch_size`` that is not a positive integer (checked for
                every pair before any is scored).
        """
        batch_size = _check_batch_size(batch_size)
        lead = "" if self.use_chat_template else " "
        continuations, answers = [], []
        for question, answer in pairs:
            continuations.append(self._continuation_ids((), _check_question(question)))
            if not answer.strip():
                raise ValueError("Asker.answer_logprobs: the answer is empty; pass the gold answer text.")
            answers.append(self._encode(lead + answer.strip()))
        scores = []
        with self._asking():
            prefilled = self._prefilled()
            if not self._can_batch(prefilled, greedy=False):
                return [self.answer_logprob(question, answer) for question, answer in pairs]
            for first in range(0, len(answers), batch_size):
                batch = slice(first, first + batch_size)
                sequences = [torch.cat(pair) for pair in zip(continuations[batch], answers[batch], strict=True)]
                ids, mask, positions = self._left_padded(sequences)
                keep = max(len(answer) for answer in answers[batch]) + 1
                cache = self._repeated(prefilled, len(sequences), ids.shape[1])
                with grouped_query_attention(self.model, cache):
                    output = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=True,
                        **self._logits_to_keep(keep),
                        **{self._cache_kwarg: cache},
                    )
                logits = output.logits[:, -keep:]  # rows end together: each answer's tokens are its last ones
                for row, answer_ids in enumerate(answers[batch]):
                    predicting = logits[row, keep - 1 - len(answer_ids) : keep - 1].float().log_softmax(-1)
                    picked = predicting.gather(-1, answer_ids.to(predicting.device)[:, None])
                    scores.append((picked.sum().item(), len(answer_ids)))
        return scores

    def chat(self) -> Chat:
        """A multi-turn `Chat` over this asker's prefilled prefix."""
        return Chat(self)

    # ------------------------------------------------------------------ internals
    def _render(self, turns: Sequence[tuple[str, str]], question: str) -> str:
        """The full prompt text of earlier ``(question, answer)`` turns followed by ``question``."""
        questions = [q for q, _ in turns] + [question]
        first = f"{self.instruction}\n\nQuestion: {questions[0]}"
        if self.context is not None:
            first = f"{self.context.rstrip()}\n\n{first}"
        if not self.use_chat_template:
            text = f"{self.system_prompt}\n\n" if self.system_prompt is not None else ""
            text += first + "\nAnswer:"
            for (_, answer), q in zip(turns, questions[1:], strict=True):
                text += f" {answer}\n\nQuestion: {q}\nAnswer:"
            return text
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": first})
        for (_, answer), q in zip(turns, questions[1:], strict=True):
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Question: {q}"}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _continuation_text(self, turns: Sequence[tuple[str, str]], question: str) -> str:
        full = self._render(turns, question)
        if not full.startswith(self.prefix_text):
            raise ValueError(
                "Asker: the chat template renders the shared prefix differently after other turns; "
                "use use_chat_template=False."
            )
        return full[len(self.prefix_text) :]

    def _continuation_ids(self, turns: Sequence[tuple[str, str]], question: str) -> torch.Tensor:
        return self._encode(self._continuation_text(turns, question))

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _limit(self, continuation: torch.Tensor, max_new_tokens: int | None) -> int:
        limit = self.max_new_tokens if max_new_tokens is None else _check_max_new_tokens(max_new_tokens)
        total = len(self.prefix_ids) + len(continuation) + limit
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"Asker: prompt and answer need {total} positions but the model has {self.max_positions}; "
                "lower max_context_tokens or max_new_tokens."
            )
        return limit

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _asking(self) -> Any:
        """Eval mode and no gradients while asking (a context manager); the model's training mode is restored
        afterwards."""
        return evaluating(self.model)

    def _prefilled(self) -> Any:
        """The prefix's KV cache for the model's current state, prefilled on first use (`PrefixCache.prefilled()`).

        Generation appends to the cache it is given: pass each question a ``copy.deepcopy`` of it.
        """
        return self._prefix.prefilled()

    def _continuation_logits(self, continuation: torch.Tensor) -> torch.Tensor:
        """Logits over ``continuation`` (int64 ``(n,)``) after the prefix, from the prefix cache: ``(n, vocab)``."""
        with self._asking():
            cache = copy.deepcopy(self._prefilled())
            ids = torch.cat([self.prefix_ids, continuation])[None].to(self._device())
            # the model is given only the new tokens; positions continue after the cached prefix
            new = ids[:, len(self.prefix_ids) :]
            output = self.model(
                input_ids=new, attention_mask=torch.ones_like(ids), use_cache=True, **{self._cache_kwarg: cache}
            )
            return output.logits[0]

    def _generate(self, continuation: torch.Tensor, limit: int, cache: Any, **kwargs: Any) -> torch.Tensor:
        """Greedy new token ids (int64 ``(new_tokens,)``) after the prefix and ``continuation``, continuing from
        ``cache`` (a copy of the prefix's); call in `_asking()` (or a thread: generate turns gradients off itself)."""
        ids = torch.cat([self.prefix_ids, continuation])[None].to(self._device())
        with grouped_query_attention(self.model):
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                max_new_tokens=limit,
                eos_token_id=self.eos_token_ids or None,
                pad_token_id=self._pad_token_id,
                **{self._cache_kwarg: cache},
                **kwargs,
            )
        return output[0, ids.shape[1] :].cpu()

    def _can_batch(self, prefilled: Any, greedy: bool) -> bool:
        """Whether a batch computes what one question alone does: the model takes explicit positions; its prefix
        cache has only plain dynamic layers (a sliding-window layer would count the pads in its window); and, for
        ``greedy`` decoding, its generation config asks ``generate`` for no logits processor (the batched loop takes
        the plain argmax)."""
        layers = getattr(prefilled, "layers", None)
        plain = bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        config = getattr(self.model, "generation_config", None)
        processors = any(getattr(config, name, None) not in neutral for name, neutral in _PROCESSOR_SETTINGS.items())
        return plain and accepts_argument(self.model, "position_ids") and not (greedy and processors)

    def _logits_to_keep(self, count: int) -> dict[str, int]:
        return logits_to_keep(self.model, count)

    def _repeated(self, prefilled: Any, rows: int, room: int) -> Any:
        """The prefix cache (of plain dynamic layers) continued by ``rows`` rows, one per question of a batch, with
        room for ``room`` more tokens each: the prefix kept once (`SharedPrefixLayer`, for
        `grouped_query_attention()`) where the model's attention can read it so, else copied to every row
        (`CopiedPrefixLayer`)."""
        layer_type = SharedPrefixLayer if shares_prefix(self.model) else CopiedPrefixLayer
        cache = copy.copy(prefilled)
        cache.layers = [layer_type(layer, rows, room) for layer in prefilled.layers]
        return cache

    def _left_padded(self, sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids ``(rows, longest)`` of ``sequences`` (each int64 ``(n,)``, to follow the prefix) padded on the
        left, their attention mask ``(rows, prefix + longest)`` (zeros on the pads) and position ids ``(rows,
        longest)`` continuing from the prefix without counting the pads: each row computes what it does alone."""
        prefix, longest = len(self.prefix_ids), max(len(sequence) for sequence in sequences)
        ids = torch.full((len(sequences), longest), self._pad_token_id, dtype=torch.long)
        mask = torch.ones((len(sequences), prefix + longest), dtype=torch.long)
        positions = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            pads = longest - len(sequence)
            ids[row, pads:] = sequence
            mask[row, prefix : prefix + pads] = 0
            positions[row, pads:] = torch.arange(prefix, prefix + len(sequence))
        device = self._device()
        return ids.to(device), mask.to(device), positions.to(device)

    def _generate_many(
        self, continuations: Sequence[torch.Tensor], limits: Sequence[int], prefilled: Any
    ) -> list[list[int]]:
        """Greedy new token ids of each continuation (as `_generate()`: a stopping end-of-sequence id included),
        decoded together from the prefix cache ``prefilled`` (`_repeated()`); call in `_asking()`."""
        ids, mask, positions = self._left_padded(continuations)
        cache = self._repeated(prefilled, len(continuations), ids.shape[1] + max(limits))
        with grouped_query_attention(self.model, cache):
            return self._decode_rows(ids, mask, positions, limits, cache)

    def _decode_rows(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, limits: Sequence[int], cache: Any
    ) -> list[list[int]]:
        """`_generate_many()`'s greedy loop over left-padded ``ids``, their ``mask`` and ``positions``."""
        rows = list(range(len(limits)))  # the question of each row still decoding
        new_ids: list[list[int]] = [[] for _ in limits]
        while True:
            output = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **self._logits_to_keep(1),
                **{self._cache_kwarg: cache},
            )
            tokens = output.logits[:, -1].argmax(-1).tolist()
            going = []
            for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                new_ids[row].append(token)
                if token not in self.eos_token_ids and len(new_ids[row]) < limits[row]:
                    going.append(index)
            if not going:
                break
            cache = getattr(output, self._cache_kwarg)
            if len(going) < len(rows):
                # finished rows leave the batch: they would still cost attention over the whole prefix
                kept = torch.tensor(going, device=mask.device)
                cache.batch_select_indices(kept)
                mask, positions = mask[kept], positions[kept]
            rows = [rows[index] for index in going]
            ids = torch.tensor([[tokens[index]] for index in going], dtype=torch.long, device=mask.device)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
        return new_ids

    def _decode(self, new_ids: Sequence[int]) -> str:
        ids = list(new_ids)
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _ask(self, turns: Sequence[tuple[str, str]], question: str, max_new_tokens: int | None) -> Answer:
        continuation = self._continuation_ids(turns, question)
        limit = self._limit(continuation, max_new_tokens)
        with self._asking():
            prefilled = self._prefilled()  # a first prefill is not the question's time
            start = time.perf_counter()
            new_ids = self._generate(continuation, limit, copy.deepcopy(prefilled))
        return Answer(
            question=question,
            text=self._decode(new_ids.tolist()).strip(),
            prompt_tokens=len(self.prefix_ids) + len(continuation),
            new_tokens=len(new_ids),
            seconds=time.perf_counter() - start,
        )

    def _stream(self, continuation: torch.Tensor, limit: int) -> Iterator[str]:
        tokens = _TokenQueue()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._generate(
                    continuation, limit, cache, streamer=tokens, stopping_criteria=StoppingCriteriaList([tokens])
                )
            except BaseException as error:  # re-raised in the consumer
                failure.append(error)
            finally:
                tokens.end()

        with self._asking():
            cache = copy.deepcopy(self._prefilled())  # prefilled here: threads do not inherit no_grad
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                new_ids: list[int] = []
                emitted = ""
                while (piece := tokens.queue.get()) is not None:
                    new_ids += piece
                    text = self._decode(new_ids).rstrip("\ufffd")  # an unfinished character waits for its bytes
                    if text.startswith(emitted) and len(text) > len(emitted):
                        yield text[len(emitted) :]
                        emitted = text
                if failure:
                    raise failure[0]
                rest = self._decode(new_ids)
                if len(rest) > len(emitted):
                    yield rest[len(emitted) :]
            finally:
                tokens.stop = True
                worker.join()


class Chat:
    """A multi-turn conversation over an `Asker`'s prefilled prefix: a follow-up sees the earlier questions and
    answers (as user / assistant messages with a chat template; as further ``Question:`` / ``Answer:`` lines in the
    plain form). Only the text after the shared prefix is run again on each turn."""

    def __init__(self, asker: Asker) -> None:
        self.asker = asker
        #: the ``(question, answer text)`` turns so far
        self.turns: list[tuple[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        """The exchanged messages after the shared prefix, ``{"role": "user" | "assistant", "content": ...}``."""
        return [m for q, a in self.turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]

    def ask(self, question: str, *, max_new_tokens: int | None = None) -> Answer:
        """Answer ``question`` after the earlier turns and remember the exchange (see `Asker.ask()`)."""
        answer = self.asker.ask(question, max_new_tokens=max_new_tokens, turns=self.turns)
        self.turns.append((answer.question, answer.text))
        return answer

    def stream(self, question: str, *, max_new_tokens: int | None = None) -> Iterator[str]:
        """Stream the answer to ``question`` after the earlier turns (see `Asker.stream()`); the exchange is
        remembered once the answer is complete (a stream closed early is forgotten)."""
        pieces = self.asker.stream(question, max_new_tokens=max_new_tokens, turns=self.turns)
        return self._remembered(_check_question(question), pieces)

    def _remembered(self, question: str, pieces: Iterator[str]) -> Iterator[str]:
        text = ""
        for piece in pieces:
            text += piece
            yield piece
        self.turns.append((question, text.strip()))

    def reset(self) -> None:
        """Forget the turns (the prefix stays prefilled)."""
        self.turns.clear()


class _TokenQueue(BaseStreamer, StoppingCriteria):
    """Hands generated token ids to the consuming thread, and stops generation once the consumer has gone."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.stop = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.queue.put(value.reshape(-1).tolist())
        self._prompt_seen = True  # generate puts the prompt first

    def end(self) -> None:
        self.queue.put(None)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)


def _check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("Asker: the question is empty; pass a non-empty question.")
    return question.strip()


def _check_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Asker: `batch_size` must be a positive integer, got {value!r}.")
    return value


def _check_max_new_tokens(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Asker: `max_new_tokens` must be a positive integer, got {value!r}.")
    return value


def _check_turns(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = list(turns)
    for turn in pairs:
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError(f"Asker: `turns` must be (question, answer) pairs of strings, got {turn!r}.")
    return [(question, answer) for question, answer in pairs]
