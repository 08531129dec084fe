"""On the real model and a real book: after the same few training steps on one chunk, a memory initialised by
cloning the context's most active units ("top_k") predicts the *next* chunk better than a Gaussian one (the paper's
ablation, Gaussian 19.90 vs top-K 19.04 PPL). Skips unless `python -m peft_locas.assets` has prepared the assets."""

import pytest
import torch

assets = pytest.importorskip("peft_locas.assets")
MODEL_DIR = assets.default_model_dir()
BOOK = assets.book_path("pride_and_prejudice")
pytestmark = pytest.mark.skipif(MODEL_DIR is None or BOOK is None, reason="run `python -m peft_locas.assets` first")

CHUNK, OFFSET, STEPS, LR, R = 256, 1000, 4, 4e-3, 16


def _next_chunk_loss(method: str, train: torch.Tensor, next_chunk: torch.Tensor) -> float:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_locas import LocasConfig, init_locas_weights

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    model = get_peft_model(base, LocasConfig(r=R, init_weights="data"))
    init_locas_weights(model, [{"input_ids": train}], method=method, seed=0, show_progress_bar=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        model(input_ids=train, labels=train).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.base_model.clip_memory_norms_()
    with torch.no_grad():
        return model(input_ids=next_chunk, labels=next_chunk).loss.item()


def test_top_k_init_beats_gaussian_on_the_next_chunk_of_a_book():
    from transformers import AutoTokenizer

    text = BOOK.read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(MODEL_DIR)(text, return_tensors="pt").input_ids
    train, next_chunk = ids[:, OFFSET : OFFSET + CHUNK], ids[:, OFFSET + CHUNK : OFFSET + 2 * CHUNK]
    assert next_chunk.shape[1] == CHUNK
    top_k = _next_chunk_loss("top_k", train, next_chunk)
    gaussian = _next_chunk_loss("gaussian", train, next_chunk)
    print(f"next-chunk loss: top_k {top_k:.4f}, gaussian {gaussian:.4f}, margin {gaussian - top_k:.4f} nats")
    assert top_k < gaussian, f"top_k {top_k:.4f} should beat gaussian {gaussian:.4f}"
