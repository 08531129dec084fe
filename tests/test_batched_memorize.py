"""Several texts memorised side by side into separate memories (`memorize(..., adapter_names=[...])`): each memory,
its losses and its checkpoints equal a separate single-text run's; resuming a killed batch; what is refused."""

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_models import VOCAB, tiny_model

from peft_locas import LocasConfig
from peft_locas.engine.checkpointing import latest_checkpoint
from peft_locas.engine.memorization import MemorizeConfig, memorize, templora_config

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["long", "middle", "short"]


def texts() -> list[torch.Tensor]:
    """Three texts of different lengths, so the shorter ones drop out of the batch's later rounds."""
    return [
        torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
        for seed, n in enumerate((150, 110, 70))
    ]


def adapter_weights(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def assert_runs_equal(batched, separate, batched_model, separate_models) -> None:
    for name, result, alone, model in zip(NAMES, batched, separate, separate_models, strict=True):
        assert result.token_counts == alone.token_counts
        for field in ("losses", "baseline_losses", "train_losses"):
            got, want = getattr(result, field), getattr(alone, field)
            assert (got is None) == (want is None), field
            if want is not None:
                assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (name, field)
        mine, theirs = adapter_weights(batched_model, name), adapter_weights(model, "default")
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize(
    "family, objective",
    [("llama", "ntp"), ("gpt_neox", "ntp"), ("llama", "distill")],
)
def test_each_memory_equals_a_separate_single_text_run(family, objective):
    settings = dict(chunk_tokens=24, context_tokens=8, steps_per_chunk=2, lr=2e-2, compare_baseline=True)
    if objective == "distill":
        settings.update(objective="distill", teacher_context_tokens=64, distill_top_k=16, ntp_weight=0.5)
    config = MemorizeConfig(**settings)
    peft_config = LocasConfig(r=8)
    separate = [memorize(tiny_model(family), None, ids, config, peft_config=peft_config) for ids in texts()]
    seen = []
    batched = memorize(
        tiny_model(family),
        None,
        texts(),
        config,
        peft_config=peft_config,
        adapter_names=NAMES,
        callback=lambda name, index, result: seen.append((name, index, len(result.losses))),
    )
    assert [len(result.losses) for result in batched] == [7, 5, 3]
    assert batched[0].model is batched[2].model and set(batched[0].model.peft_config) == set(NAMES)
    assert_runs_equal(batched, separate, batched[0].model, [r.model for r in separate])
    # rounds in order; a text that ended drops out
    assert seen[:3] == [("long", 0, 1), ("middle", 0, 1), ("short", 0, 1)]
    assert seen[-2:] == [("long", 5, 6), ("long", 6, 7)] and len(seen) == 15


def test_memories_learn_only_from_their_own_text():
    """A memory's gradient is its own row's: with one text replaced, the other memories do not change at all."""
    config = MemorizeConfig(chunk_tokens=24, context_tokens=8, steps_per_chunk=1, lr=2e-2)
    first = memorize(tiny_model(), None, texts(), config, peft_config=LocasConfig(r=8), adapter_names=NAMES)
    other = texts()
    other[1] = torch.randint(1, VOCAB, (110,), generator=torch.Generator().manual_seed(99))
    second = memorize(tiny_model(), None, other, config, peft_config=LocasConfig(r=8), adapter_names=NAMES)
    for name in ("long", "short"):
        mine, theirs = adapter_weights(first[0].model, name), adapter_weights(second[0].model, name)
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert first[1].losses[1:] != second[1].losses[1:]


def test_a_killed_batch_resumes_every_memory_from_its_checkpoint(tmp_path):
    settings = dict(chunk_tokens=24, context_tokens=8, steps_per_chunk=2, lr=2e-2, compare_baseline=True)
    full = memorize(
        tiny_model(), None, texts(), MemorizeConfig(**settings), peft_config=LocasConfig(r=8), adapter_names=NAMES
    )
    config = MemorizeConfig(**settings, checkpoint_dir=tmp_path, checkpoint_every=2)

    class Killed(Exception):
        pass

    def kill(name, index, result):
        if (name, index) == ("middle", 2):  # in round 3: "long" is at 3 chunks, its checkpoint at 2
            raise Killed

    with pytest.raises(Killed):
        memorize(tiny_model(), None, texts(), config, peft_config=LocasConfig(r=8), adapter_names=NAMES, callback=kill)
    # each memory has its own checkpoint, a single-text run's, at its own last saved chunk
    assert [latest_checkpoint(tmp_path / name).name for name in NAMES] == [
        "chunk-000002",
        "chunk-000002",
        "chunk-000002",
    ]
    resumed = memorize(tiny_model(), None, texts(), config, peft_config=LocasConfig(r=8), adapter_names=NAMES)
    for result, want in zip(resumed, full, strict=True):
        assert result.losses == pytest.approx(want.losses, rel=1e-5)
        assert result.baseline_losses == pytest.approx(want.baseline_losses, rel=1e-5)
    for name in NAMES:
        mine, theirs = adapter_weights(resumed[0].model, name), adapter_weights(full[0].model, name)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert [latest_checkpoint(tmp_path / name).name for name in NAMES] == [
        "chunk-000007",
        "chunk-000005",
        "chunk-000003",
    ]


def test_a_peft_model_with_the_adapters_is_trained_in_place():
    model = get_peft_model(tiny_model(), LocasConfig(r=8), adapter_name="first")
    model.add_adapter("second", LocasConfig(r=8))
    results = memorize(model, None, texts()[:2], MemorizeConfig(chunk_tokens=24), adapter_names=["first", "second"])
    assert results[0].model is model and all(len(r.losses) > 1 for r in results)


def test_what_a_batch_refuses():
    ids = texts()
    config = MemorizeConfig(chunk_tokens=24)
    with pytest.raises(ValueError, match="2 adapter names for 3 texts: give one name per text"):
        memorize(tiny_model(), None, ids, config, adapter_names=["x", "y"])
    with pytest.raises(ValueError, match="adapter names must be distinct"):
        memorize(tiny_model(), None, ids, config, adapter_names=["x", "y", "x"])
    with pytest.raises(ValueError, match="`adapter_names` must be a list of non-empty adapter names"):
        memorize(tiny_model(), None, ids, config, adapter_names="abc")
    with pytest.raises(ValueError, match="memorise LoRA adapters one text at a time"):
        memorize(tiny_model(), None, ids, config, peft_config=templora_config(4), adapter_names=["x", "y", "z"])
    with pytest.raises(ValueError, match="self-study runs one text at a time"):
        memorize(tiny_model(), None, ids, MemorizeConfig(chunk_tokens=24, self_study_questions=1), adapter_names=NAMES)
    with pytest.raises(ValueError, match=r"text 1 \(adapter 'y'\): the text has 10 tokens, fewer than one chunk"):
        memorize(tiny_model(), None, [ids[0], ids[1][:10]], config, adapter_names=["x", "y"])
    for name, why in [
        ("__base__", "PEFT's per-sample `adapter_names` reads it as no adapter at all"),
        ("v1.2", "'.' cannot appear in a module name"),
        ("a/b", "would save the adapter into a subfolder"),
        ("loc", "contained in the parameters' prefix 'locas_'"),
    ]:
        with pytest.raises(
            ValueError, match=re.escape(f"adapter name {name!r} cannot be used: ") + ".*" + re.escape(why)
        ):
            memorize(tiny_model(), None, ids[:2], config, adapter_names=["x", name])
    model = get_peft_model(tiny_model(), LocasConfig(r=8), adapter_name="first")
    with pytest.raises(ValueError, match="the model has no Locas adapter named 'second'"):
        memorize(model, None, ids[:2], config, adapter_names=["first", "second"])
