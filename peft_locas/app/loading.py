"""Loading the model for a command: a local folder, this rank's device, optional bitsandbytes quantization, and an
adapter checked against the model before PEFT reads it."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ..distributed import Ranks
from .options import UsageError, one_line


def load(model_dir: Path, args: argparse.Namespace, tokenizer: Any = None) -> tuple[Any, Any, Ranks]:
    """Model (eval mode, on this rank's device) and tokenizer (``tokenizer`` when the command loaded it already) from
    a local folder; starts the process group when the command runs under torchrun / accelerate launch."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device}: {one_line(exc)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here")
    ranks = start_distributed(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    # safetensors only: a pickled pytorch_model.bin could run code
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": args.dtype, "use_safetensors": True}
    if args.load_in_4bit or args.load_in_8bit:
        compute = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
        quantization = (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
            if args.load_in_4bit
            else {"load_in_8bit": True}
        )
        kwargs.update(quantization_config=BitsAndBytesConfig(**quantization), device_map={"": device})
    try:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UsageError(f"cannot load a causal language model from {model_dir}: {one_line(exc)}") from exc
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval(), tokenizer, ranks


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's tokenizer (cheap: read before the model loads, to check inputs against it)."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UsageError(f"cannot load a tokenizer from {model_dir}: {one_line(exc)}") from exc


def load_adapter(model: Any, adapter: Path, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` after `check_adapter_fits` (one-line errors instead of PEFT's long ones)."""
    from peft import PeftModel

    check_adapter_fits(model, adapter)
    return PeftModel.from_pretrained(model, adapter, **kwargs)


def load_adapters(model: Any, adapters: list[Path], names: list[str]) -> Any:
    """A ``PeftModel`` holding every adapter under its name (each checked with `check_adapter_fits` first)."""
    from peft import PeftModel

    for adapter in adapters:
        check_adapter_fits(model, adapter)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(adapter, adapter_name=name)
    return peft_model


def check_adapter_fits(model: Any, adapter: Path) -> None:
    """Refuse an adapter made for another base model (another layer count or hidden size), or a damaged weights file,
    before loading it, with the reason in one line."""
    weights = adapter / "adapter_model.safetensors"
    try:
        with safe_open(weights, framework="pt") as tensors:
            shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{weights} is not a readable safetensors file ({one_line(exc)})") from exc
    text_config = model.config.get_text_config()
    layers, hidden = getattr(text_config, "num_hidden_layers", None), getattr(text_config, "hidden_size", None)
    modules = dict(model.named_modules())
    for key, shape in sorted(shapes.items()):
        match = re.match(r"base_model\.model\.(.+?)\.(locas_memory|lora_[AB]|lora_embedding_[AB])\.(\w+)", key)
        if match is None:
            continue
        name, kind, part = match.groups()
        index = re.search(r"\.(\d+)\.", f".{name}.")
        if name not in modules:
            if index is not None and layers is not None and int(index.group(1)) >= layers:
                raise UsageError(
                    f"adapter {adapter} was made for another base model: it has layer {index.group(1)}, this model has "
                    f"{layers} layers"
                )
            raise UsageError(f"adapter {adapter} was made for another base model: this model has no module {name}")
        expected = _expected_width(modules[name], kind, part, hidden)
        if expected is None:
            continue
        actual = shape[-1] if kind == "locas_memory" or kind.endswith("A") else shape[0]
        if actual != expected:
            raise UsageError(
                f"adapter {adapter} was made for another base model: its {name} has {actual} features, this model's "
                f"{expected} (hidden size {hidden}, {layers} layers)"
            )


def _expected_width(module: Any, kind: str, part: str, hidden: int | None) -> int | None:
    """The dimension of the base model an adapter tensor must match: the hidden size for a Locas memory's rows, the
    input (A) or output (B) features for LoRA."""
    if kind == "locas_memory":
        return hidden if part in ("gate", "key", "value") else None
    return getattr(module, "in_features" if kind.endswith("A") else "out_features", None)


def start_distributed(device: torch.device) -> Ranks:
    """Join the process group that torchrun / accelerate launch describe in the environment (gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks.current()


def end_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
