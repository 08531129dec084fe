"""The memorisation engine on tiny models: protocol order, both perplexity aggregations, learning, determinism,
resuming after a kill, refusing other runs' checkpoints, and LoRA through the same loop."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_model

from peft_locas import LocasConfig
from peft_locas.engine.checkpointing import CheckpointError, latest_checkpoint
from peft_locas.engine.chunking import Window, chunk_windows
from peft_locas.engine.memorization import MemorizeConfig, evaluate, memorize, templora_config
from peft_locas.engine.results import MemorizeResult

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def hand_nll(model, ids: torch.Tensor, window: Window) -> torch.Tensor:
    """Per-token NLL of a window's scored tokens, computed directly from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=ids[window.start : window.end][None]).logits[0].float()
    log_probs = logits.log_softmax(-1)
    positions = torch.arange(window.first, window.end)
    return -log_probs[positions - 1 - window.start, ids[positions]]


def test_chunk_windows_cover_the_text_once():
    windows = chunk_windows(130, chunk_tokens=40, context_tokens=16)
    assert windows == [Window(0, 1, 40), Window(24, 40, 80), Window(64, 80, 120), Window(104, 120, 130)]
    # without context a chunk's first token has nothing to be predicted from
    assert chunk_windows(81, 40, 0) == [Window(0, 1, 40), Window(40, 41, 80)]
    shares = [Window(24, 40, 80).share(rank, 3) for rank in range(3)]
    assert [(s.start, s.first, s.end) for s in shares] == [(24, 40, 53), (24, 53, 66), (24, 66, 80)]
    with pytest.raises(ValueError, match="the text has 30 tokens, fewer than one chunk of 40"):
        chunk_windows(30, 40, 16)


def test_first_chunk_is_scored_before_training_and_baseline_is_the_base_model():
    ids = random_ids(96)
    config = MemorizeConfig(chunk_tokens=32, context_tokens=8, steps_per_chunk=2, lr=2e-2, compare_baseline=True)
    base = tiny_model()
    expected = [hand_nll(base, ids, w).mean().item() for w in chunk_windows(96, 32, 8)]
    result = memorize(tiny_model(), None, ids, config, peft_config=LocasConfig(r=8))
    # top-k init has value 0: before any training the memory is a no-op, so chunk 0 scores as the base model
    assert result.losses[0] == pytest.approx(expected[0], rel=1e-6)
    assert result.baseline_losses == pytest.approx(expected, rel=1e-6)
    assert result.losses[1] != pytest.approx(expected[1], rel=1e-6)  # chunk 1 is scored after training on chunk 0
    assert isinstance(result.model, PeftModel)


def test_perplexity_aggregations_match_a_hand_computation():
    ids = random_ids(130, seed=3)
    model = get_peft_model(tiny_model(), LocasConfig(r=4, init_weights=False))  # a non-identity memory
    config = MemorizeConfig(chunk_tokens=40, context_tokens=16, steps_per_chunk=0, init=None)
    result = memorize(model, None, ids, config)
    per_chunk = [hand_nll(model, ids, w) for w in chunk_windows(130, 40, 16)]
    assert result.token_counts == [39, 40, 40, 10]
    assert result.losses == pytest.approx([nll.mean().item() for nll in per_chunk], rel=1e-5)
    all_nll = torch.cat(per_chunk).double()
    assert result.perplexity == pytest.approx(math.exp(all_nll.mean().item()), rel=1e-5)
    templora = sum(len(nll) * math.exp(nll.double().mean().item()) for nll in per_chunk) / len(all_nll)
    assert result.mean_chunk_perplexity == pytest.approx(templora, rel=1e-5)
    assert result.mean_chunk_perplexity > result.perplexity  # Jensen
    scored = evaluate(model, None, ids, chunk_tokens=40, context_tokens=16, compare_baseline=True)
    assert scored.losses == pytest.approx(result.losses, rel=1e-6)
    with model.disable_adapter():
        base = [hand_nll(model, ids, w).mean().item() for w in chunk_windows(130, 40, 16)]
    assert scored.baseline_losses == pytest.approx(base, rel=1e-5)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["perplexity"] == pytest.approx(result.perplexity) and data["total_tokens"] == 129
    assert MemorizeResult.from_dict(data).losses == result.losses


@pytest.mark.parametrize(
    "adapter", [LocasConfig(r=8), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")], ids=["locas", "lora"]
)
def test_loss_falls_on_a_repeated_text(adapter):
    ids = random_ids(48).repeat(4)
    config = MemorizeConfig(chunk_tokens=48, context_tokens=0, steps_per_chunk=4, lr=1e-2, compare_baseline=True)
    result = memorize(tiny_model(), None, ids, config, peft_config=adapter)
    assert all(b > a for a, b in zip(result.losses[1:], result.losses, strict=False)), result.losses
    assert result.losses[-1] < result.baseline_losses[-1] - 0.3
    assert result.perplexity < result.baseline_perplexity
    assert result.tokens_per_s > 0 and result.peak_memory_bytes > 0


def test_locas_rows_are_clipped_and_lora_uses_the_templora_recipe():
    ids = random_ids(64)
    result = memorize(tiny_model(), None, ids, MemorizeConfig(chunk_tokens=32, lr=0.5), peft_config=LocasConfig(r=8))
    norms = [p.norm(dim=1).max().item() for n, p in result.model.named_parameters() if "locas_memory" in n]
    assert max(norms) <= 1 + 1e-6  # a huge learning rate, yet every row stays in the unit ball
    assert MemorizeConfig().recipe("lora") == {"lr": 5e-5, "adam_eps": 1e-7, "warmup_steps": 2}
    assert MemorizeConfig(lr=1e-3).recipe("locas") == {"lr": 1e-3, "adam_eps": 1e-8, "warmup_steps": 0}
    lora = templora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (64, 64, 0.05, "all-linear")


def test_runs_are_deterministic():
    """LoRA dropout draws random numbers during training: the seed fixes them, and the adapter's initialisation."""
    ids = random_ids(96)

    def run(seed):
        config = MemorizeConfig(chunk_tokens=32, context_tokens=8, lr=1e-2, seed=seed)
        result = memorize(tiny_model(), None, ids, config, peft_config=templora_config(4))
        return result.losses, adapter_state(result.model)

    (losses, weights), (again, weights_again), (other, weights_other) = run(0), run(0), run(1)
    assert losses == again and all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert not all(torch.equal(weights[k], weights_other[k]) for k in weights) and losses[1:] != other[1:]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="`chunk_tokens` must be an integer >= 2"):
        MemorizeConfig(chunk_tokens=1)
    with pytest.raises(ValueError, match="`lr` must be a positive number"):
        MemorizeConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="unknown `init` 'top'"):
        MemorizeConfig(init="top")
    with pytest.raises(ValueError, match="fewer than one chunk"):
        memorize(tiny_model(), None, random_ids(20), MemorizeConfig(chunk_tokens=32))
    with pytest.raises(ValueError, match="pass a tokenizer"):
        memorize(tiny_model(), None, "some text", MemorizeConfig(chunk_tokens=32))
    model = get_peft_model(tiny_model(), LocasConfig(r=4))
    with pytest.raises(ValueError, match="already is a PeftModel"):
        memorize(model, None, random_ids(64), MemorizeConfig(chunk_tokens=32), peft_config=LocasConfig(r=4))


# ---------------------------------------------------------------------------------------------- checkpoints
WORKER_CONFIG = dict(chunk_tokens=24, context_tokens=8, steps_per_chunk=2, lr=1e-2, compare_baseline=True)


def worker_run(adapter: str, checkpoint_dir=None, callback=None):
    """The run ``memorize_worker.py`` makes (6 chunks, a checkpoint every 2), here in this process."""
    peft_config = LocasConfig(r=8) if adapter == "locas" else templora_config(4)
    config = MemorizeConfig(**WORKER_CONFIG, checkpoint_dir=checkpoint_dir, checkpoint_every=2)
    return memorize(tiny_model(), None, random_ids(24 * 6), config, peft_config=peft_config, callback=callback)


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")

    def worker(*extra):
        command = [sys.executable, str(TESTS / "memorize_worker.py"), str(tmp_path), *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    killed = worker("3")  # stopped right after chunk 3; checkpoints come every 2 chunks, so chunk 3 is redone
    assert killed.returncode == -9, killed.stderr[-3000:]
    for adapter in ("locas", "lora"):
        assert latest_checkpoint(tmp_path / adapter / "checkpoints").name == "chunk-000002"
    resumed = worker()
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for adapter in ("locas", "lora"):
        expected = worker_run(adapter)
        saved = json.loads((tmp_path / adapter / "result.json").read_text())
        assert saved["losses"] == expected.losses and saved["baseline_losses"] == expected.baseline_losses, adapter
        weights = load_file(tmp_path / adapter / "adapter.safetensors")
        reference = adapter_state(expected.model)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), f"{adapter}: resumed weights differ"
        final = latest_checkpoint(tmp_path / adapter / "checkpoints")
        assert final.name == "chunk-000006"
        assert PeftModel.from_pretrained(tiny_model(), final / "adapter") is not None  # a loadable adapter


def test_other_runs_and_corrupt_checkpoints_are_refused(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    done = worker_run("locas", checkpoints)
    again = worker_run("locas", checkpoints)  # complete: the saved result comes back, nothing is trained
    assert again.losses == done.losses and again.wall_time_s == done.wall_time_s

    def resume(model=None, ids=None, peft_config=None, **changes):
        config = MemorizeConfig(**{**WORKER_CONFIG, **changes}, checkpoint_dir=checkpoints, checkpoint_every=2)
        ids = random_ids(24 * 6) if ids is None else ids
        return memorize(model or tiny_model(), None, ids, config, peft_config=peft_config or LocasConfig(r=8))

    with pytest.raises(CheckpointError, match=r"belongs to another run \(text: checkpoint: 144 tokens.*now: 144"):
        resume(ids=random_ids(24 * 6, seed=5))
    with pytest.raises(CheckpointError, match=r"\(settings: chunk_tokens 24 -> 32\)"):
        resume(chunk_tokens=32)
    with pytest.raises(CheckpointError, match=r"\(model: same architecture, another config or other weights\)"):
        resume(model=tiny_model(seed=1))
    with pytest.raises(CheckpointError, match=r"\(model: checkpoint: llama.*now: qwen2"):
        resume(model=tiny_model("qwen2"))
    with pytest.raises(CheckpointError, match=r"\(adapter config: r 8 -> 4\)"):
        resume(peft_config=LocasConfig(r=4))

    latest = latest_checkpoint(checkpoints)
    (checkpoints / ".partial-chunk-000008").mkdir()  # an interrupted save is ignored
    optimizer = (latest / "optimizer.safetensors").read_bytes()
    (latest / "optimizer.safetensors").write_bytes(optimizer[: len(optimizer) // 2])
    with pytest.raises(CheckpointError, match=r"chunk-000006 is corrupt or incomplete \(SafetensorError"):
        resume()
    (latest / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"chunk-000006 is corrupt \(JSONDecodeError.*delete .* to start over"):
        resume()
    shutil.rmtree(latest)
    assert resume().losses == done.losses  # nothing left to resume: a fresh, identical run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("adapter", ["locas", "lora"])
def test_memorize_and_resume_on_cuda(adapter, tmp_path):
    """On the GPU: the model's device is used, chunk 0 scores as the base model, peak memory is CUDA's, and a resumed
    run (CUDA RNG state included, which LoRA dropout draws from) continues the interrupted one."""
    ids = random_ids(24 * 6)
    expected = hand_nll(tiny_model().cuda(), ids.cuda(), chunk_windows(len(ids), 24, 8)[0]).mean().item()

    def run(checkpoint_dir, callback=None):
        peft_config = LocasConfig(r=8) if adapter == "locas" else templora_config(4)
        config = MemorizeConfig(**WORKER_CONFIG, checkpoint_dir=checkpoint_dir, checkpoint_every=2)
        return memorize(tiny_model().cuda(), None, ids, config, peft_config=peft_config, callback=callback)

    def stop(index, result):
        if index == 2:
            raise KeyboardInterrupt

    uninterrupted = run(tmp_path / "a")
    assert uninterrupted.losses[0] == pytest.approx(expected, rel=1e-5)
    assert uninterrupted.peak_memory_kind == "cuda_max_allocated" and uninterrupted.peak_memory_bytes > 0
    assert all(p.is_cuda for p in uninterrupted.model.parameters())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop)
    resumed = run(tmp_path / "b")
    assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-6, abs=1e-7)
    reference = adapter_state(uninterrupted.model)
    for key, tensor in adapter_state(resumed.model).items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-6, rtol=1e-5)
