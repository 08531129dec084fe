"""CUDA-only checks of peft-locas, run once on a machine with an NVIDIA GPU (CI has none).

Covers what the CPU suite cannot: memories beside fp16/bf16 bases under CUDA autocast, and bitsandbytes 4-bit/8-bit
bases with bitsandbytes' CUDA kernels (train, merge, exact unmerge, float export). Tiny models built from configs, so
no model hub is needed. Writes ``benchmarks/results/cuda_check.json`` and prints one line per check.

    python benchmarks/cuda_check.py [--out benchmarks/results/cuda_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from peft import get_peft_model

import peft_locas
from peft_locas import LocasConfig, LocasLayer

DEVICE = "cuda"


def tiny(family: str, tmp: Path) -> Path:
    """Save a seeded tiny model of ``family`` and return its folder (quantized loads need a checkpoint)."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128))
    else:
        config = tf.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = tf.LlamaForCausalLM(config)
    folder = tmp / family
    model.save_pretrained(folder)
    return folder


def tokens() -> torch.Tensor:
    return torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def train(model: torch.nn.Module, x: torch.Tensor, steps: int = 6, autocast: torch.dtype | None = None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clip_memory_norms_()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def check_half(folder: Path, dtype: torch.dtype) -> dict:
    x = tokens()
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE).eval()
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights="gaussian"))
    memory = next(m for m in peft_model.modules() if isinstance(m, LocasLayer)).locas_memory["default"]
    assert memory.key.dtype == torch.float32 and memory.key.device.type == "cuda"
    assert torch.equal(logits(peft_model, x), base), "untrained memory must leave the base outputs unchanged"
    losses = train(peft_model, x, autocast=dtype)
    assert losses[-1] < losses[0], losses
    unmerged = logits(peft_model, x)
    merged = logits(peft_model.merge_and_unload(), x)
    return {"losses": losses, "merge_max_abs_diff": (merged - unmerged).abs().max().item()}


def check_quantized(folder: Path, quantization: dict) -> dict:
    x = tokens()
    config = tf.BitsAndBytesConfig(**quantization)
    load = lambda: tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=DEVICE).eval()  # noqa: E731
    model = load()
    base = logits(model, x)
    peft_model = get_peft_model(model, LocasConfig(r=8, init_weights="gaussian"))
    assert torch.equal(logits(peft_model, x), base)
    losses = train(peft_model, x)
    assert losses[-1] < losses[0], losses
    unmerged = logits(peft_model, x)
    weights = [(m, m.weight) for m in peft_model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    peft_model.merge_adapter()
    merged = logits(peft_model, x)
    peft_model.unmerge_adapter()
    assert all(m.weight is w for m, w in weights), "unmerge must restore the very same quantized weights"
    assert torch.equal(logits(peft_model, x), unmerged)
    kept = 1 - ((merged - unmerged).norm() / (unmerged - base).norm()).item()
    exported = logits(peft_model.merge_and_unload(dequantize=True), x)
    return {
        "losses": losses,
        "requantized_merge_memory_effect_kept": kept,
        "dequantized_export_max_abs_diff": (exported - unmerged).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    tmp = Path("/tmp/peft_locas_cuda_check")
    folders = {family: tiny(family, tmp) for family in ("llama", "gpt2")}
    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    checks: dict[str, Callable[[], dict]] = {
        "llama-bf16-autocast": lambda: check_half(folders["llama"], torch.bfloat16),
        "llama-fp16-autocast": lambda: check_half(folders["llama"], torch.float16),
        "llama-4bit-nf4": lambda: check_quantized(folders["llama"], nf4),
        "llama-4bit-fp4-double": lambda: check_quantized(
            folders["llama"], dict(nf4, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
        ),
        "llama-8bit": lambda: check_quantized(folders["llama"], dict(load_in_8bit=True)),
        "gpt2-4bit-nf4": lambda: check_quantized(folders["gpt2"], nf4),
        "gpt2-8bit": lambda: check_quantized(folders["gpt2"], dict(load_in_8bit=True)),
    }
    results = {
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": tf.__version__,
            "peft_locas": peft_locas.__version__,
            "bitsandbytes": __import__("bitsandbytes").__version__,
            "peft": __import__("peft").__version__,
        },
        "checks": {},
    }
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            outcome = {"ok": True, **check()}
        except Exception as error:  # a failed check is recorded, the others still run
            outcome = {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc()[-2000:],
            }
        outcome["seconds"] = round(time.perf_counter() - start, 2)
        results["checks"][name] = outcome
        print(
            f"{'PASS' if outcome['ok'] else 'FAIL'} {name}: "
            + json.dumps({k: v for k, v in outcome.items() if k != "trace"})
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    passed = sum(c["ok"] for c in results["checks"].values())
    print(f"{passed} passed, {len(checks) - passed} failed")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
