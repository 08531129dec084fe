"""Tiny bases saved to disk and reloaded with bitsandbytes quantization (CPU), shared by the quantized tests."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def load(saved_bases: Path, family: str = "llama", quantization: str | None = "nf4") -> torch.nn.Module:
    """The saved tiny ``family`` model, quantized as ``quantization`` names (``None``: full precision), in eval mode."""
    config = None if quantization is None else BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    model = AutoModelForCausalLM.from_pretrained(saved_bases / family, quantization_config=config, device_map="cpu")
    return model.eval()
