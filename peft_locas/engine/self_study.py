"""Self-study: questions the model writes about each chunk it memorises, answered by the model reading the chunk (the
teacher) and distilled into the model with the memory and no chunk in view (the student).

Why: next-token prediction on a text stores its facts but rarely makes them extractable by questions unless training
also sees them asked or rephrased (Allen-Zhu & Li, "Physics of Language Models: Part 3.1", arXiv 2309.14316); a memory
trained on a dialogue that way absorbs its style, not the answers to questions about it. Cartridges (Eyuboglu et al.,
arXiv 2506.06266, "self-study"; ``cartridges/synthesizers/self_study.py``) train on synthetic conversations instead:
the model, reading the corpus, writes a message from a seed prompt (sampled, temperature 0.6); the model reading the
corpus answers it greedily (the teacher); the trainable cache is fitted, without the corpus, to the teacher's top
log-probabilities over the answer tokens. `memorize()` does this per chunk (``MemorizeConfig.self_study_questions``):

1. **questions** (`write_questions`): the base model reads the chunk's window (its text, context prefix included)
   followed by a seed prompt, rotated over `SEED_PROMPTS` (a name, place, number or date; what someone did or plans;
   a relationship; what someone owns or likes; when or where; Cartridges' generic knowledge question), and writes one
   question, sampled at `TEMPERATURE` from a ``torch.Generator`` seeded by (run seed, chunk, question): runs repeat
   and resume exactly, and the run's own random numbers are not drawn. The question is one line, up to its question
   mark, without a leading ``Question:`` label or quotes; empty and repeated questions are dropped.
2. **teacher answers** (`teach`): the base model answers each question greedily with the window in context, prompted
   exactly as ``Asker(model, tokenizer, context=window text)`` prompts (at most `MAX_ANSWER_TOKENS` tokens, its
   end-of-sequence token kept when it stops on one, so the student also learns where an answer ends); its
   next-token distributions at the answer tokens are kept as `TeacherTargets` (top-k, ``distill_top_k``).
3. **student** (`SelfStudy.train`): the model *with* the memory and no context, prompted exactly as
   ``Asker(model, tokenizer, instruction=memory_instruction(...))`` asks from memory at question time (same chat
   template, the instruction for a conversation or a text, ``Question: ...``), teacher-forced on the teacher's answer
   tokens; the loss is ``KL(teacher || student)`` summed over all answer tokens of the chunk's questions, divided by
   their number; each step is the engine's own optimiser step (same AdamW, learning-rate schedule and memory-norm
   clipping).

Each prompt prefix (the window and what precedes the seed prompt or the question) is run once per chunk; every
question or answer continues from a copy of its KV cache, so a chunk is never re-read per question.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..recall.asking import Asker
from ..recall.prefix_cache import PrefixCache, accepts_argument, end_of_sequence_ids
from ..recall.prompts import memory_instruction
from .objectives import TeacherTargets, kl_divergence

#: seed prompts, one per question, rotated (Cartridges' seed types, narrowed to the facts a dialogue states; the last
#: is Cartridges' "question" seed prompt)
SEED_PROMPTS: tuple[str, ...] = (
    "Write one question about a name, a place, a number or a date stated in the text above. Say who or what it is "
    "about, so that the question is clear without the text. Write only the question.",
    "Write one question about something a person in the text above did, or plans to do. Name the person. Write only "
    "the question.",
    "Write one question about how two people in the text above, or a person and a thing, are related. Write only the "
    "question.",
    "Write one question about what someone in the text above owns, likes or cares about. Name them. Write only the "
    "question.",
    "Write one question asking when or where something mentioned in the text above happened. Write only the question.",
    "Write one question that tests knowledge of the information in the text above. Include the details (names, "
    "places, dates, numbers) that make clear what it asks about. Write only the question.",
)
#: sampling temperature of the questions (Cartridges samples its seed-prompted messages at 0.6; a little higher here,
#: as a small model repeats itself more)
TEMPERATURE = 0.7
#: the longest question, in new tokens (decoding stops earlier, at its question mark or the end of its line)
MAX_QUESTION_TOKENS = 48
#: the longest teacher answer, in new tokens (LoCoMo's answers are short phrases)
MAX_ANSWER_TOKENS = 24
# a label or quoting a small model puts around its question; the student's prompt already says "Question:"
_LABEL = re.compile(r"^(?:question|q)\s*\d*\s*[:.)]\s*", re.IGNORECASE)
_QUOTES = " \t\"'`*"


@dataclass(frozen=True)
class StudyExample:
    """One synthetic question and the teacher's answer.

    ``answer_ids`` (int64 ``(n,)``, CPU) are the teacher's greedy answer tokens, its end-of-sequence token included
    when it stopped on one; ``teacher`` its next-token distributions at the ``n`` positions predicting them (on the
    model's device); ``answer`` the answer's text (decoded as `Asker.ask` decodes it).
    """

    question: str
    answer: str
    answer_ids: torch.Tensor
    teacher: TeacherTargets

    def record(self) -> dict[str, str]:
        """``{"question": ..., "answer": ...}``: what a run records of it."""
        return {"question": self.question, "answer": self.answer}


def question_seed(run_seed: int, chunk_index: int, question_index: int) -> int:
    """The seed (63 bits) of one question's sampling generator: a hash of the run's seed, the chunk and the question."""
    digest = hashlib.sha256(f"self-study:{run_seed}:{chunk_index}:{question_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    count: int,
    *,
    run_seed: int = 0,
    chunk_index: int = 0,
    use_chat_template: bool | None = None,
    temperature: float = TEMPERATURE,
    max_new_tokens: int = MAX_QUESTION_TOKENS,
) -> list[str]:
    """Up to ``count`` distinct questions ``model`` (as it is: disable an adapter around the call to ask the base
    model) writes about ``text``, in eval mode and without gradients.

    Question ``k`` answers seed prompt ``SEED_PROMPTS[(chunk_index * count + k) % len(SEED_PROMPTS)]`` (so
    consecutive chunks start at different seeds); its tokens are sampled at ``temperature`` from a CPU generator seeded
    by `question_seed`\\ ``(run_seed, chunk_index, k)``. The prompt is one user message ``"{text}\\n\\n{seed prompt}"``
    in the tokenizer's chat template (when it has one, unless ``use_chat_template=False``), the reply begun with
    ``"Question:"`` (a small model then writes a question rather than talk about one), else the plain text
    ``"{text}\\n\\n{seed prompt}\\nQuestion:"``. The question is the first line left non-empty once a leading
    ``Question:`` label and quotes are removed, up to its first question mark (decoding stops there); questions
    without a letter or digit, and repeated ones (case-insensitively), are dropped.

    Raises:
        ValueError: ``count`` or ``max_new_tokens`` is not a positive integer, or ``temperature`` is not positive.
    """
    for name, value in (("count", count), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"write_questions: `{name}` must be a positive integer, got {value!r}.")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"write_questions: `temperature` must be a positive number, got {temperature!r}.")
    chat = getattr(tokenizer, "chat_template", None) is not None if use_chat_template is None else use_chat_template
    head = f"{text.rstrip()}\n\n"
    if chat:
        sentinel = "\x00LOCAS-SEED\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": head + sentinel}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(sentinel) != 1:
            raise ValueError(
                "write_questions: the chat template does not keep the message verbatim; pass use_chat_template=False."
            )
        prefix, after = rendered.split(sentinel)
        prefix_ids, after = _encode(tokenizer, prefix), after + "Question:"  # the reply starts as a question
    else:
        prefix_ids, after = torch.tensor(tokenizer(head)["input_ids"], dtype=torch.long), "\nQuestion:"
    decoder = PrefixCache(model, prefix_ids)
    eos = end_of_sequence_ids(model, tokenizer)

    def done(new_ids: list[int]) -> bool:  # a question mark, or a complete line with a question: nothing more is kept
        written = _decode(tokenizer, new_ids, eos)
        return "?" in written or any(_clean_question(line) for line in written.split("\n")[:-1])

    questions: list[str] = []
    for k in range(count):
        seed_prompt = SEED_PROMPTS[(chunk_index * count + k) % len(SEED_PROMPTS)]
        generator = torch.Generator().manual_seed(question_seed(run_seed, chunk_index, k))

        def sample(logits: torch.Tensor, generator: torch.Generator = generator) -> int:
            probs = (logits.detach().float().cpu() / temperature).softmax(-1)
            return int(torch.multinomial(probs, 1, generator=generator))

        tokens = _encode(tokenizer, seed_prompt + after)
        new_ids, _ = decoder.decode(tokens, max_new_tokens, eos_token_ids=eos, pick=sample, stop=done)
        question = _first_question(_decode(tokenizer, new_ids, eos))
        if any(c.isalnum() for c in question) and question.casefold() not in {q.casefold() for q in questions}:
            questions.append(question)
    return questions


def teach(
    teacher: Asker, questions: Sequence[str], top_k: int | None, max_new_tokens: int = MAX_ANSWER_TOKENS
) -> list[StudyExample]:
    """The greedy answers of ``teacher`` (an `Asker`; its model as it is, in eval mode, without gradients) to
    ``questions`` and its next-token distributions over them (`TeacherTargets.from_logits` with ``top_k``).

    The answers are `Asker.ask`'s greedy tokens (at most ``max_new_tokens``, fewer at the end of the model's
    positions), decoded by `Asker.continue_from` from one prefill of the asker's prefix; questions answered with
    nothing (an immediate end of sequence) are dropped.
    """
    examples = []
    for question in questions:
        continuation = teacher.continuation_ids(question)
        new_ids, logits = teacher.continue_from(continuation, max_new_tokens=max_new_tokens)
        answer = _decode(teacher.tokenizer, new_ids, teacher.eos_token_ids).strip()
        if answer:
            targets = TeacherTargets.from_logits(logits, top_k)
            examples.append(StudyExample(question.strip(), answer, torch.tensor(new_ids, dtype=torch.long), targets))
    return examples


def student_kl(model: torch.nn.Module, prompt_ids: torch.Tensor, example: StudyExample) -> torch.Tensor:
    """``(n,)`` float32: ``KL(teacher || student)`` at each of the example's answer tokens, the student being ``model``
    (as it is, with gradients) reading ``prompt_ids`` (int64 ``(1, P)``, e.g. `Asker.prompt_ids`) and the teacher's
    answer tokens up to the one predicted."""
    n = len(example.answer_ids)
    ids = torch.cat([prompt_ids[0], example.answer_ids]).to(model.get_input_embeddings().weight.device)[None]
    kwargs = {"logits_to_keep": n + 1} if accepts_argument(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -n - 1 : -1]
    return kl_divergence(example.teacher, logits)


class SelfStudy:
    """Self-study for one `memorize()` run: per chunk, `examples` (questions and teacher answers from the base model)
    and `train` (the student's steps). Built from the ``PeftModel`` being trained and its tokenizer; the student's
    prompts are those of ``Asker(model, tokenizer, instruction=memory_instruction(conversation))``, so the memory is
    trained on the very prompts it is asked with.

    Args:
        model: the ``PeftModel`` whose active adapter is trained; the base model is itself with the adapter disabled.
        tokenizer: its tokenizer (reads the chunks and writes the prompts).
        questions: questions written per chunk (before empty and repeated ones are dropped).
        steps: optimiser steps per chunk on its questions (0: the questions and answers are only recorded).
        seed: the run's seed (the questions' generators derive from it, `question_seed`).
        top_k: the teacher's kept tokens per position (``MemorizeConfig.distill_top_k``; ``None``: all).
        conversation: whether a conversation is memorised (`memory_instruction`: how the student is asked).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        questions: int,
        steps: int,
        seed: int,
        top_k: int | None,
        conversation: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.questions = questions
        self.steps = steps
        self.seed = seed
        self.top_k = top_k
        #: asks as the memorised model is asked at question time: no context, the instruction for what it memorised
        self.student = Asker(model, tokenizer, instruction=memory_instruction(conversation))

    def examples(self, token_ids: Sequence[int] | torch.Tensor, chunk_index: int) -> list[StudyExample]:
        """The chunk's questions and the teacher's answers, from the base model (adapter disabled) reading the
        window's tokens ``token_ids`` (decoded without special tokens); the model's training mode is kept."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        with self.model.disable_adapter():
            questions = write_questions(
                self.model,
                self.tokenizer,
                text,
                self.questions,
                run_seed=self.seed,
                chunk_index=chunk_index,
                use_chat_template=self.student.use_chat_template,
            )
            teacher = Asker(
                self.model,
                self.tokenizer,
                context=text,
                use_chat_template=self.student.use_chat_template,
                max_new_tokens=MAX_ANSWER_TOKENS,
            )
            return teach(teacher, questions, self.top_k)

    def train(self, examples: Sequence[StudyExample], update: Callable[[], None]) -> list[float]:
        """``steps`` optimiser steps of the student on ``examples`` (none without examples), in training mode:
        each backpropagates the summed KL over all answer tokens divided by their number, then calls ``update()``
        (the engine's step: optimiser, schedule, clipping, gradients zeroed). Returns each step's loss, taken before
        its update (float, nats per answer token)."""
        if not examples:
            return []
        prompts = [self.student.prompt_ids(example.question) for example in examples]
        tokens = sum(len(example.answer_ids) for example in examples)
        self.model.train()
        losses = []
        for _ in range(self.steps):
            total = 0.0
            for prompt, example in zip(prompts, examples, strict=True):
                part = student_kl(self.model, prompt, example).sum() / tokens
                part.backward()  # one question at a time: only one answer's activations are held
                total += part.item()
            update()
            losses.append(total)
        return losses

    def run(self, token_ids: Sequence[int] | torch.Tensor, chunk_index: int, update: Callable[[], None]) -> dict:
        """`examples` then `train` for one chunk: the record ``{"questions": [{"question", "answer"}, ...],
        "losses": [per step]}`` a `MemorizeResult` keeps."""
        examples = self.examples(token_ids, chunk_index)
        losses = self.train(examples, update)
        return {"questions": [example.record() for example in examples], "losses": losses}


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _decode(tokenizer: Any, ids: Sequence[int], eos: Sequence[int]) -> str:
    ids = list(ids[:-1]) if ids and ids[-1] in eos else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _first_question(text: str) -> str:
    """The first line of ``text`` left non-empty by `_clean_question`, up to its first question mark ("" if none)."""
    question = next(filter(None, map(_clean_question, text.split("\n"))), "")
    return question[: question.index("?") + 1] if "?" in question else question


def _clean_question(line: str) -> str:
    """A line without surrounding quotes or emphasis and a leading ``Question:`` label (empty if nothing is left)."""
    return _LABEL.sub("", line.strip(_QUOTES)).strip(_QUOTES)
