"""Self-study (``MemorizeConfig(self_study_questions=N)``, peft_locas.engine.self_study) on a tiny Llama with a real
tiny tokenizer: the student is prompted exactly as `Asker` asks from memory, the teacher answers exactly as an `Asker`
reading the chunk, the KL is zero when they agree and falls when trained, only the memory learns, runs repeat and
resume exactly, the setting off (or generating without steps) changes nothing, and the refused settings."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_checkpoint import make_checkpoint, sample_text, tiny_tokenizer
from tiny_checkpoint import tiny_llama as llama

from peft_locas import LocasConfig, cli
from peft_locas.distributed import Ranks
from peft_locas.engine import self_study
from peft_locas.engine.checkpointing import CheckpointError
from peft_locas.engine.chunking import chunk_windows
from peft_locas.engine.memorization import MemorizeConfig, memorize, templora_config
from peft_locas.engine.objectives import TeacherTargets
from peft_locas.engine.self_study import (
    MAX_ANSWER_TOKENS,
    SelfStudy,
    StudyExample,
    question_seed,
    student_kl,
    teach,
    write_questions,
)
from peft_locas.recall.asking import Asker

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK, CONTEXT = 48, 16


def text(words: int = 140) -> str:
    return sample_text(words)


def study_config(**changes) -> MemorizeConfig:
    settings = dict(chunk_tokens=CHUNK, context_tokens=CONTEXT, steps_per_chunk=1, lr=1e-2, self_study_questions=2)
    return MemorizeConfig(**{**settings, **changes})


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adamw_update(model, lr: float = 1e-2):
    """An optimiser step on the trainable parameters, as the engine's (without its schedule)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clip_memory_norms_()

    return update


# ------------------------------------------------------------------------------------------------ the pieces
def test_the_student_prompt_and_the_teacher_are_the_askers(tokenizer):
    """The student reads, token for token, what `Asker(model, tokenizer)` builds at question time, then the teacher's
    answer tokens; the teacher's answers are what `Asker(model, tokenizer, context=chunk)` answers with the adapter
    disabled, and its targets its log-probabilities over those tokens (a full forward, no cache)."""
    model = get_peft_model(llama(tokenizer), LocasConfig(r=8, init_weights=False))  # a non-zero memory
    ids = tokenizer(text())["input_ids"][:CHUNK]
    study = SelfStudy(model, tokenizer, questions=3, steps=1, seed=0, top_k=None)
    examples = study.examples(ids, chunk_index=0)
    assert len(examples) >= 2
    chunk = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    teacher = Asker(model, tokenizer, chunk)
    for example in examples:
        assert 1 <= len(example.answer_ids) <= MAX_ANSWER_TOKENS
        with model.disable_adapter():
            assert example.answer == teacher.ask(example.question, max_new_tokens=MAX_ANSWER_TOKENS).text
            ids_in = torch.cat([teacher.prompt_ids(example.question)[0], example.answer_ids])[None]
            with torch.no_grad():
                logits = model(input_ids=ids_in, use_cache=False).logits[0, -len(example.answer_ids) - 1 : -1]
        torch.testing.assert_close(example.teacher.log_probs, logits.float().log_softmax(-1), atol=1e-4, rtol=0)
        assert example.answer_ids.tolist() == logits.argmax(-1).tolist()  # greedy

    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0][0].tolist()))
    study.train(examples, lambda: None)
    hook.remove()
    student = Asker(model, tokenizer)
    assert seen == [student.prompt_ids(e.question)[0].tolist() + e.answer_ids.tolist() for e in examples]
    assert model.training  # the student's steps run in training mode


def test_a_text_is_studied_with_the_instruction_it_is_asked_with(tokenizer, monkeypatch):
    """memorize() builds its self-study student for what it reads: a conversation is asked (and studied) with
    LoCoMo's "conversation you remember", a plain text, or documents with a text among them, with "the text you
    remember"."""
    from peft_locas.recall import Conversation, Session, Turn
    from peft_locas.recall.asking import MEMORY_INSTRUCTION, TEXT_MEMORY_INSTRUCTION

    students = []
    monkeypatch.setattr(SelfStudy, "examples", lambda study, ids, chunk_index: [])
    built = SelfStudy.__init__
    monkeypatch.setattr(SelfStudy, "__init__", lambda study, *a, **k: built(study, *a, **k) or students.append(study))
    turns = tuple(Turn("Ann" if k % 2 else "Bob", text(12)) for k in range(12))
    conversation = Conversation(None, (Session(1, "1 May 2023", turns),))
    config = study_config(self_study_questions=1)
    for source in (text(), conversation, [conversation, text()], [conversation, conversation]):
        memorize(llama(tokenizer), tokenizer, source, config, peft_config=LocasConfig(r=8))
    instructions = [study.student.instruction for study in students]
    assert instructions == [TEXT_MEMORY_INSTRUCTION, MEMORY_INSTRUCTION, TEXT_MEMORY_INSTRUCTION, MEMORY_INSTRUCTION]
    assert "Based on the text you remember, write an answer" in students[0].student.prompt("Who?")


def test_the_kl_is_zero_when_the_teacher_is_the_student_and_falls_when_trained(chat_tokenizer):
    """A memory of value 0 is the base model: a teacher asked exactly as the student (no context) agrees with it, so
    the loss is 0. A teacher that differs (another model reading the chunk) is approached step by step."""
    model = get_peft_model(llama(chat_tokenizer), LocasConfig(r=8))  # value 0: the base model
    study = SelfStudy(model, chat_tokenizer, questions=3, steps=6, seed=0, top_k=16)
    questions = write_questions(model, chat_tokenizer, text(), 3)
    with model.disable_adapter():
        same = teach(Asker(model, chat_tokenizer), questions, top_k=16)
    assert same and all(student_kl(model, study.student.prompt_ids(e.question), e).abs().max() < 1e-5 for e in same)
    assert max(abs(loss) for loss in study.train(same, lambda: None)) < 1e-5

    other = teach(Asker(llama(chat_tokenizer, seed=1), chat_tokenizer, text()), questions, top_k=16)
    model.zero_grad(set_to_none=True)
    losses = study.train(other, adamw_update(model))
    assert losses[0] > 1e-3 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    tokens = sum(len(e.answer_ids) for e in other)
    with torch.no_grad():  # the reported loss is the KL summed over all answer tokens, divided by their number
        kl = sum(student_kl(model, study.student.prompt_ids(e.question), e).sum().item() for e in other) / tokens
    assert study.train(other, lambda: None)[0] == pytest.approx(kl, rel=1e-4)


def test_questions_are_seeded_lines():
    tokenizer = tiny_tokenizer()
    model = llama(tokenizer)
    first = write_questions(model, tokenizer, text(), 4, run_seed=0, chunk_index=0)
    assert first == write_questions(model, tokenizer, text(), 4, run_seed=0, chunk_index=0)
    assert first != write_questions(model, tokenizer, text(), 4, run_seed=0, chunk_index=1)
    assert first != write_questions(model, tokenizer, text(), 4, run_seed=1, chunk_index=0)
    assert all(q and "\n" not in q and q == q.strip() for q in first)
    assert len({q.casefold() for q in first}) == len(first)
    assert question_seed(0, 1, 2) == question_seed(0, 1, 2) != question_seed(0, 2, 1)
    assert 0 <= question_seed(5, 6, 7) < 2**63
    clean = self_study._clean_question
    assert clean(" **Question: Who owns the boat?** ") == "Who owns the boat?"
    assert clean('"Q1: When did Ann move?"') == "When did Ann move?"
    assert clean("Question:") == "" and clean("Quentin asked what?") == "Quentin asked what?"
    first = self_study._first_question
    assert first(" \nQuestion:\n Who is Ann's aunt? Mara.\nWhere?") == "Who is Ann's aunt?"
    assert first("Where did Bob go\nnext") == "Where did Bob go" and first("\n '' \n") == ""
    with pytest.raises(ValueError, match=r"^write_questions: `count` must be a positive integer, got 0\.$"):
        write_questions(model, tokenizer, text(), 0)
    with pytest.raises(ValueError, match=r"^write_questions: `temperature` must be a positive number, got 0\.$"):
        write_questions(model, tokenizer, text(), 1, temperature=0)


# ------------------------------------------------------------------------------------------------ in the engine
def test_gradients_reach_only_the_memory(chat_tokenizer):
    """No regular steps (steps_per_chunk=0), two self-study steps per chunk: the memory (value 0 at the start) is
    trained by self-study alone; every base weight is frozen, gradient-free and bit-identical."""
    base = llama(chat_tokenizer)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    config = study_config(steps_per_chunk=0, self_study_steps=2)
    result = memorize(base, chat_tokenizer, text(), config, peft_config=LocasConfig(r=8))
    model = result.model
    assert result.train_losses is None and len(result.self_study) == len(result.losses)
    assert all(len(record["losses"]) == 2 for record in result.self_study if record["questions"])
    memory = {name for name, p in model.named_parameters() if p.requires_grad}
    assert memory and all("locas_memory" in name for name in memory)
    for name, parameter in model.get_base_model().named_parameters():
        if name in before:
            assert not parameter.requires_grad and parameter.grad is None, name
            assert torch.equal(parameter, before[name]), name
    values = [p for name, p in model.named_parameters() if "locas_memory" in name and p.requires_grad]
    assert any(p.abs().sum() > 0 for p in values)


@pytest.mark.parametrize("adapter", [LocasConfig(r=8), templora_config(4)], ids=["locas", "lora-with-dropout"])
def test_off_and_without_steps_are_todays_run(adapter, plain_tokenizer):
    """``self_study_questions=0`` is the run without self-study; generating questions but taking no steps changes
    neither the losses nor the weights (the questions' generators are their own: LoRA dropout draws the same numbers,
    the schedule's clock is the same) and adds nothing to the protocol of a run without it."""
    runs = {}
    for name, changes in {"off": {"self_study_questions": 0}, "no steps": {"self_study_steps": 0}}.items():
        config = study_config(steps_per_chunk=2, warmup_steps=2, **changes)
        runs[name] = memorize(llama(plain_tokenizer), plain_tokenizer, text(), config, peft_config=adapter)
    off, generated = runs["off"], runs["no steps"]
    assert off.self_study is None and off.to_dict()["self_study"] is None
    assert generated.losses == off.losses and generated.train_losses == off.train_losses
    assert same_weights(adapter_state(generated.model), adapter_state(off.model))
    assert any(record["questions"] for record in generated.self_study)
    assert all(record["losses"] == [] for record in generated.self_study)

    today = MemorizeConfig().protocol("locas")
    assert MemorizeConfig(self_study_steps=3).protocol("locas") == today and "self_study_questions" not in today
    on = MemorizeConfig(self_study_questions=4).protocol("locas")
    assert {k: on[k] for k in ("self_study_questions", "self_study_steps", "distill_top_k")} == {
        "self_study_questions": 4,
        "self_study_steps": None,
        "distill_top_k": 64,
    }
    assert MemorizeConfig(self_study_questions=4, steps_per_chunk=3).study_steps == 3
    assert MemorizeConfig(self_study_questions=4, self_study_steps=5).study_steps == 5
    assert MemorizeConfig(self_study_steps=5).study_steps == 0


def test_runs_repeat_and_a_resumed_run_equals_the_uninterrupted_one(chat_tokenizer, tmp_path):
    source = text(200)
    chunks = len(chunk_windows(len(chat_tokenizer(source)["input_ids"]), CHUNK, CONTEXT))
    assert chunks >= 4

    def run(folder=None, callback=None, **changes):
        config = study_config(steps_per_chunk=2, self_study_steps=2, checkpoint_dir=folder, **changes)
        return memorize(
            llama(chat_tokenizer), chat_tokenizer, source, config, peft_config=LocasConfig(r=8), callback=callback
        )

    def stop(index, result):
        if index == 1:
            raise KeyboardInterrupt

    uninterrupted = run(tmp_path / "a")
    again = run()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop)
    resumed = run(tmp_path / "b")
    reference = adapter_state(uninterrupted.model)
    for other in (again, resumed):
        assert other.self_study == uninterrupted.self_study
        assert other.losses == uninterrupted.losses and other.train_losses == uninterrupted.train_losses
        assert same_weights(adapter_state(other.model), reference)
    assert len(uninterrupted.self_study) == chunks
    assert all(len(record["losses"]) == 2 for record in uninterrupted.self_study if record["questions"])
    assert sum(len(record["questions"]) for record in uninterrupted.self_study) >= chunks
    assert json.loads(json.dumps(uninterrupted.to_dict()))["self_study"] == uninterrupted.self_study
    with pytest.raises(CheckpointError, match=r"\(settings: self_study_questions 2 -> 3\)"):
        run(tmp_path / "b", self_study_questions=3)


def test_the_command_line_records_what_self_study_generated(tmp_path):
    folder = make_checkpoint(tmp_path / "model")
    (tmp_path / "text.txt").write_text(text(), encoding="utf-8")
    args = ["memorize", "--model", str(folder), "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]
    args += ["--chunk-tokens", str(CHUNK), "--context-tokens", str(CONTEXT), "--r", "8", "--steps-per-chunk", "1"]
    assert cli.main([*args, "--self-study-questions", "2"]) == 0
    record = json.loads((tmp_path / "out" / cli.RESULTS_FILE).read_text())
    assert record["settings"]["self_study_questions"] == 2
    studied = record["result"]["self_study"]
    assert len(studied) == len(record["result"]["losses"])
    assert all(set(pair) == {"question", "answer"} for chunk in studied for pair in chunk["questions"])


# ------------------------------------------------------------------------------------------------ refused settings
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"self_study_questions": -1}, "MemorizeConfig: `self_study_questions` must be an integer >= 0, got -1."),
        ({"self_study_questions": 2.0}, "MemorizeConfig: `self_study_questions` must be an integer >= 0, got 2.0."),
        ({"self_study_questions": True}, "MemorizeConfig: `self_study_questions` must be an integer >= 0, got True."),
        ({"self_study_steps": -1}, "MemorizeConfig: `self_study_steps` must be an integer >= 0, got -1."),
        ({"self_study_steps": "2"}, "MemorizeConfig: `self_study_steps` must be an integer >= 0, got '2'."),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MemorizeConfig(**changes)


def test_self_study_without_a_tokenizer_or_under_torch_distributed_is_refused(plain_tokenizer, monkeypatch):
    ids = plain_tokenizer(text())["input_ids"]
    message = "memorize: self-study reads each chunk as text: pass the tokenizer, or self_study_questions=0"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        memorize(llama(plain_tokenizer), None, ids, study_config(), peft_config=LocasConfig(r=4))
    monkeypatch.setattr(Ranks, "current", classmethod(lambda cls: cls(0, 2)))
    message = "memorize: self-study runs in a single process: set self_study_questions=0 under torch.distributed"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        memorize(llama(plain_tokenizer), plain_tokenizer, ids, study_config(), peft_config=LocasConfig(r=4))


def test_a_study_example_records_its_question_and_answer():
    targets = TeacherTargets.from_logits(torch.zeros(2, 5), 2)
    example = StudyExample("Who?", "Ann", torch.tensor([3, 4]), targets)
    assert example.record() == {"question": "Who?", "answer": "Ann"}
