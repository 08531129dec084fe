"""The memorisation engine on the real default model (SmolLM2-135M) and a real book, when the offline assets are
prepared (`peft-locas assets`); skipped otherwise. Kept tiny: two chunks of 64 tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig
from peft_locas.assets import book_path, default_model_dir
from peft_locas.engine.memorization import MemorizeConfig, memorize

MODEL_DIR = default_model_dir()
BOOK = book_path("alice_in_wonderland")
pytestmark = pytest.mark.skipif(MODEL_DIR is None or BOOK is None, reason="offline assets not prepared")


def test_a_real_book_opening_is_memorised_score_first(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True).eval()
    text = BOOK.read_text(encoding="utf-8")[:2000]
    config = MemorizeConfig(
        chunk_tokens=64, context_tokens=32, max_tokens=128, compare_baseline=True, checkpoint_dir=tmp_path
    )
    result = memorize(model, tokenizer, text, config, peft_config=LocasConfig(r=16))
    assert result.token_counts == [63, 64]
    assert result.losses[0] == pytest.approx(result.baseline_losses[0], abs=1e-6)  # top-k init: still the base model
    assert result.losses[1] != result.baseline_losses[1]  # scored after two steps on chunk 0
    assert 2 < result.baseline_perplexity < 100  # a trained model on English, not noise
    assert abs(result.perplexity / result.baseline_perplexity - 1) < 0.2
    assert (tmp_path / "chunk-000002" / "adapter" / "adapter_model.safetensors").is_file()
