"""Self-distillation (``MemorizeConfig(objective="distill")``) on tiny models: the KL itself (zero when the models
agree, top-k a lower bound equal to the full KL at k = vocabulary), the teacher's window, gradients reaching only the
memory, Locas and LoRA learning, resuming, two ranks, and the refused settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model

from peft_locas import LocasConfig
from peft_locas.engine.checkpointing import CheckpointError
from peft_locas.engine.chunking import Window, chunk_windows
from peft_locas.engine.memorization import MemorizeConfig, evaluate, memorize
from peft_locas.engine.objectives import TeacherTargets, distillation_loss, kl_divergence

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
CHUNK, CONTEXT = 24, 8


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def distill(**changes) -> MemorizeConfig:
    settings = dict(chunk_tokens=CHUNK, context_tokens=CONTEXT, steps_per_chunk=1, lr=1e-2, objective="distill")
    return MemorizeConfig(**{**settings, **changes})


def hand_kl(model, ids: torch.Tensor, window: Window, teacher_start: int) -> float:
    """Mean full KL(teacher || student) over a window's scored tokens, from the models' full logits (torch's kl_div):
    the student reads the window, the teacher (adapter disabled) reads ``[teacher_start, window.end)``."""

    def log_probs(start: int) -> torch.Tensor:
        logits = model(input_ids=ids[start : window.end][None]).logits[0].float().log_softmax(-1)
        return logits[window.first - 1 - start : window.end - 1 - start]

    was_training = model.training
    model.eval()  # no LoRA dropout (and no random numbers drawn from the run's generator)
    with torch.no_grad():
        student = log_probs(window.start)
        with model.disable_adapter():
            teacher = log_probs(teacher_start)
    model.train(was_training)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean().item()


# ------------------------------------------------------------------------------------------------ the KL itself
def test_kl_is_zero_for_equal_models_and_top_k_bounds_the_full_kl():
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(16, VOCAB, generator=generator) * 3 for _ in range(2))
    full = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    for k in (None, 1, 8, VOCAB, VOCAB + 5):
        assert kl_divergence(TeacherTargets.from_logits(teacher, k), teacher).abs().max() <= 1e-6, k
    torch.testing.assert_close(kl_divergence(TeacherTargets.from_logits(teacher, None), student), full)
    torch.testing.assert_close(kl_divergence(TeacherTargets.from_logits(teacher, VOCAB), student), full)
    bounds = [kl_divergence(TeacherTargets.from_logits(teacher, k), student) for k in (1, 8, 32)]
    assert all((b > 0).all() and (b < full).all() for b in bounds)
    assert (bounds[0] <= bounds[1] + 1e-6).all() and (bounds[1] <= bounds[2] + 1e-6).all()  # finer: closer

    # k = 8 by hand, in float64: the two distributions over the 8 tokens and "any other token"
    p, q = teacher.double().softmax(-1), student.double().softmax(-1)
    top = p.topk(8, dim=-1).indices
    coarse_p, coarse_q = (
        torch.cat([d.gather(-1, top), 1 - d.gather(-1, top).sum(-1, keepdim=True)], -1) for d in (p, q)
    )
    expected = (coarse_p * (coarse_p / coarse_q).log()).sum(-1)
    torch.testing.assert_close(bounds[1].double(), expected, rtol=1e-4, atol=1e-6)
    targets = TeacherTargets.from_logits(teacher, 8)
    assert targets.log_probs.shape == (16, 8) and targets.rest.shape == (16,) and targets.ids.dtype == torch.long
    # float32 parts summed: a few float32 ulps off 1 (2e-7 seen on one CPU), float64's default tolerance is 1e-7
    torch.testing.assert_close(
        targets.top_mass.double() + targets.rest.double().exp(),
        torch.ones(16, dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )

    ids = torch.randint(0, VOCAB, (16,), generator=generator)
    weighted = distillation_loss(student, ids, targets, ntp_weight=0.5)
    torch.testing.assert_close(weighted, bounds[1].sum() + 0.5 * F.cross_entropy(student, ids, reduction="sum"))
    with pytest.raises(ValueError, match=re.escape("distillation_loss: no teacher targets for this window")):
        distillation_loss(student, ids, None, 0.0)


def test_the_gradient_of_an_underflowed_student_stays_finite():
    """A student that puts (numerically) no mass outside the teacher's top-k: the clamps keep log(0) out."""
    teacher = torch.zeros(2, VOCAB)
    student = torch.full((2, VOCAB), -200.0)
    student[:, :4] = 0.0
    student.requires_grad_(True)
    kl = kl_divergence(TeacherTargets.from_logits(teacher, 4), student).sum()
    kl.backward()
    assert torch.isfinite(kl) and kl > 0 and torch.isfinite(student.grad).all()


# ------------------------------------------------------------------------------------------------ in the engine
@pytest.mark.parametrize(
    "adapter", [LocasConfig(r=8), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")], ids=["locas", "lora"]
)
def test_kl_is_zero_when_the_teacher_sees_what_the_student_sees(adapter):
    """A memory with value 0 (LoRA: B = 0) is the base model. With the student's own window the teacher agrees: the
    KL and its gradient are 0, so nothing is ever learnt. With a longer window (the default: all it can read) the
    teacher agrees on chunk 0 only, where the text's start limits both to the same tokens."""
    ids = random_ids(3 * CHUNK)
    same = memorize(tiny_model(), None, ids, distill(teacher_context_tokens=CHUNK + CONTEXT), peft_config=adapter)
    assert max(abs(loss) for loss in same.train_losses) <= 1e-6 and len(same.train_losses) == 3
    longer = memorize(tiny_model(), None, ids, distill(), peft_config=adapter)
    assert abs(longer.train_losses[0]) <= 1e-6
    assert longer.train_losses[1] > 1e-4 and longer.train_losses[2] > 1e-4


def test_the_engine_kl_is_the_mean_kl_of_the_long_context_teacher():
    """``train_losses[i]`` (one step per chunk) is the full KL of chunk i, the memory as chunk i - 1 left it and the
    teacher reading the last ``teacher_context_tokens`` tokens up to the chunk's end; the scores stay plain NTP."""
    ids = random_ids(5 * CHUNK)
    model = get_peft_model(tiny_model(), LocasConfig(r=8))
    windows = chunk_windows(len(ids), CHUNK, CONTEXT)
    teacher_tokens = 2 * CHUNK + 10
    expected = {0: hand_kl(model, ids, windows[0], 0)}  # a memory of value 0 (top-k init), a teacher that sees more

    def check_next_chunk(index, result):
        if index + 1 < len(windows):
            window = windows[index + 1]
            expected[index + 1] = hand_kl(model, ids, window, max(0, window.end - teacher_tokens))

    config = distill(teacher_context_tokens=teacher_tokens, distill_top_k=None, compare_baseline=True)
    result = memorize(model, None, ids, config, callback=check_next_chunk)
    assert result.train_losses == pytest.approx([expected[i] for i in range(5)], rel=1e-4, abs=1e-7)
    assert expected[0] == pytest.approx(0.0, abs=1e-6) and expected[3] > 1e-3  # chunk 0: the teacher sees no more
    scored = evaluate(tiny_model(), None, ids, chunk_tokens=CHUNK, context_tokens=CONTEXT)
    assert result.baseline_losses == pytest.approx(scored.losses, rel=1e-6)  # scoring is NTP, short window


def test_default_teacher_reads_all_it_can_and_ntp_weight_adds_the_nll():
    """``teacher_context_tokens=None`` takes max_position_embeddings (here more than the text: the whole prefix)."""
    ids = random_ids(4 * CHUNK)
    windows = chunk_windows(len(ids), CHUNK, CONTEXT)
    model = get_peft_model(tiny_model(), LocasConfig(r=8))
    expected = {}

    def check_next_chunk(index, result):
        if index + 1 < len(windows):
            expected[index + 1] = hand_kl(model, ids, windows[index + 1], 0)

    result = memorize(model, None, ids, distill(distill_top_k=None), callback=check_next_chunk)
    assert result.train_losses[1:] == pytest.approx([expected[i] for i in (1, 2, 3)], rel=1e-4)

    # with an NTP weight and the student's own window, the first chunk's loss is the weighted NLL alone (KL 0)
    weighted = memorize(tiny_model(), None, ids, distill(ntp_weight=0.5, teacher_context_tokens=CHUNK + CONTEXT))
    assert weighted.train_losses[0] == pytest.approx(0.5 * weighted.losses[0], rel=1e-5)


def test_gradients_reach_only_the_memory():
    base = tiny_model()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    result = memorize(base, None, random_ids(3 * CHUNK), distill(steps_per_chunk=2), peft_config=LocasConfig(r=8))
    model = result.model
    memory = {name for name, p in model.named_parameters() if p.requires_grad}
    assert memory and all("locas_memory" in name for name in memory)
    for name, parameter in model.get_base_model().named_parameters():
        if name in before:  # a base weight: frozen, never given a gradient, bit-identical
            assert not parameter.requires_grad and parameter.grad is None, name
            assert torch.equal(parameter, before[name]), name
    values = [p for name, p in model.named_parameters() if "locas_memory" in name and p.requires_grad]
    assert any(p.abs().sum() > 0 for p in values)  # the memory did change (its value matrix starts at 0)


@pytest.mark.parametrize(
    "adapter", [LocasConfig(r=8), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")], ids=["locas", "lora"]
)
def test_distillation_lowers_the_kl_on_the_chunk_it_trains_on(adapter):
    ids = random_ids(3 * CHUNK)
    model = get_peft_model(tiny_model(), adapter)
    windows = chunk_windows(len(ids), CHUNK, CONTEXT)
    last, before = windows[-1], {}

    def measure(index, result):
        if index == len(windows) - 2:
            before["kl"] = hand_kl(model, ids, last, 0)

    memorize(model, None, ids, distill(steps_per_chunk=6, distill_top_k=16), callback=measure)
    after = hand_kl(model, ids, last, 0)
    assert before["kl"] > 1e-3 and after < 0.8 * before["kl"], (before, after)


# ------------------------------------------------------------------------------------------------ resume, ranks
def test_a_resumed_distill_run_equals_the_uninterrupted_one(tmp_path):
    ids = random_ids(6 * CHUNK)

    def run(folder, callback=None, **changes):
        config = distill(steps_per_chunk=2, teacher_context_tokens=3 * CHUNK, checkpoint_dir=folder, **changes)
        return memorize(tiny_model(), None, ids, config, peft_config=LocasConfig(r=8), callback=callback)

    def stop(index, result):
        if index == 3:
            raise KeyboardInterrupt

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop)
    assert (tmp_path / "b" / "chunk-000004").is_dir()
    resumed = run(tmp_path / "b")
    assert resumed.losses == uninterrupted.losses and resumed.train_losses == uninterrupted.train_losses
    reference = adapter_state(uninterrupted.model)
    assert all(torch.equal(tensor, reference[k]) for k, tensor in adapter_state(resumed.model).items())
    with pytest.raises(CheckpointError, match=r"\(settings: distill_top_k 64 -> 8\)"):
        run(tmp_path / "b", distill_top_k=8)
    with pytest.raises(CheckpointError, match=r"\(settings: distill_top_k 64 -> None, ntp_weight 0\.0 -> None"):
        run(tmp_path / "b", objective="ntp")  # an NTP run's protocol has no distillation settings


def distributed_run():
    """The distillation run every rank of the 2-process test makes (5 chunks, one of 21 tokens so shares differ)."""
    ids = random_ids(117)
    config = MemorizeConfig(
        chunk_tokens=16,
        context_tokens=8,
        steps_per_chunk=2,
        lr=1e-2,
        objective="distill",
        teacher_context_tokens=64,
        distill_top_k=16,
        ntp_weight=0.25,
    )
    result = memorize(tiny_model(), None, ids, config, peft_config=LocasConfig(r=8))
    return result, evaluate(result.model, None, ids, chunk_tokens=16, context_tokens=8)


def test_two_gloo_ranks_distill_as_a_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(TESTS / "memorize_distributed_worker.py"), str(tmp_path), "--objective", "distill"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    single, scored = distributed_run()
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    weights = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert ranks[0]["train_losses"] == pytest.approx(single.train_losses, rel=1e-4, abs=1e-7)
    assert ranks[0]["scored"] == pytest.approx(scored.losses, rel=1e-5)
    for key, tensor in adapter_state(single.model).items():
        torch.testing.assert_close(weights[0][key], tensor, atol=1e-5, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------------------ refused settings
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"objective": "kl"}, "MemorizeConfig: unknown `objective` 'kl'; choose one of ntp, distill."),
        ({"distill_top_k": 0}, "MemorizeConfig: `distill_top_k` must be an integer >= 1, got 0."),
        ({"distill_top_k": 2.0}, "MemorizeConfig: `distill_top_k` must be an integer >= 1, got 2.0."),
        ({"ntp_weight": -1}, "MemorizeConfig: `ntp_weight` must be a number >= 0, got -1."),
        ({"ntp_weight": float("inf")}, "MemorizeConfig: `ntp_weight` must be a number >= 0, got inf."),
        ({"ntp_weight": True}, "MemorizeConfig: `ntp_weight` must be a number >= 0, got True."),
        (
            {"teacher_context_tokens": 100},
            "MemorizeConfig: `teacher_context_tokens` must be an integer >= chunk_tokens + context_tokens "
            "(768, the student's window) or None, got 100.",
        ),
        (
            {"teacher_context_tokens": 1000.0},
            "MemorizeConfig: `teacher_context_tokens` must be an integer >= chunk_tokens + context_tokens "
            "(768, the student's window) or None, got 1000.0.",
        ),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MemorizeConfig(**changes)


def test_a_model_too_short_for_the_default_teacher_is_refused():
    model = tiny_model()
    model.config.max_position_embeddings = 16
    message = (
        "memorize: the model's max_position_embeddings is 16, not at least the student's window "
        "(chunk_tokens + context_tokens = 32): set MemorizeConfig.teacher_context_tokens"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        memorize(model, None, random_ids(3 * CHUNK), distill(), peft_config=LocasConfig(r=4))
