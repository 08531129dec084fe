"""Resumable memorisation: atomic checkpoints of a run, refused when they belong to another run.

A checkpoint directory holds one complete checkpoint, ``chunk-000012/`` (named by the chunks done), containing
``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``: loadable with ``PeftModel.from_pretrained``),
``optimizer.safetensors``, ``rng-rank<k>.safetensors`` (one per rank) and ``state.json`` (format, fingerprint,
parameter names, results so far). It is written under a temporary name and renamed once complete, so a run killed at
any moment leaves the previous checkpoint intact. Tensors are read with safetensors and everything else with JSON:
nothing is unpickled, so a checkpoint cannot run code.

The fingerprint names what a resumed run must share with the saved one for the results to continue it: the model
(config and embedding weights), the adapter config, the protocol settings and the memorised tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..distributed import Ranks

FORMAT = 1
_PREFIX = "chunk-"
_PARTIAL = ".partial-"
# PeftConfig fields that record where or how an adapter was loaded, not what it computes
_ADAPTER_BOOKKEEPING = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message is one line naming the checkpoint, the reason and the fix."""


def jsonable(value: Any) -> Any:
    """``value`` as the JSON round trip gives it back (sets as sorted lists, enums as values), so a fingerprint
    computed now compares equal to one read from ``state.json``."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=str)
        if isinstance(obj, Enum):
            return obj.value
        return str(obj)

    return json.loads(json.dumps(value, default=default, sort_keys=True))


def adapter_settings(config: Any) -> dict[str, Any]:
    """What identifies an adapter config (a ``PeftConfig``), without load-time bookkeeping."""
    settings = jsonable(config.to_dict())
    return {key: value for key, value in settings.items() if key not in _ADAPTER_BOOKKEEPING}


def fingerprint(
    model: torch.nn.Module, adapter: Mapping[str, Any], settings: Mapping[str, Any], token_ids: Sequence[int]
) -> dict[str, Any]:
    """Everything a resumed run must share with the checkpoint: model, adapter config, protocol settings, tokens."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = {k: v for k, v in base.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    embedding = base.get_input_embeddings().weight.detach()
    text = getattr(base.config, "get_text_config", lambda: base.config)()
    summary = (
        f"{base.config.model_type}, {getattr(text, 'num_hidden_layers', '?')} layers, hidden size "
        f"{getattr(text, 'hidden_size', '?')}, {str(embedding.dtype).removeprefix('torch.')}"
    )
    return jsonable(
        {
            "model": {
                "summary": summary,
                "config_sha256": _sha256(json.dumps(jsonable(config), sort_keys=True).encode()),
                "embedding_sha256": _sha256(_tensor_bytes(embedding)),
            },
            "adapter": dict(adapter),
            "settings": dict(settings),
            "text": {"tokens": len(token_ids), "sha256": _sha256(_tensor_bytes(torch.tensor(token_ids)))},
        }
    )


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    chunks_done: int,
    peft_model: PeftModel,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    parameter_names: Sequence[str],
    run_fingerprint: Mapping[str, Any],
    result: Mapping[str, Any],
    ranks: Ranks,
) -> Path:
    """Write the run's state after ``chunks_done`` chunks atomically and remove older checkpoints; every rank calls
    it (each saves its own RNG state, rank 0 the rest)."""
    directory = Path(directory)
    final = directory / f"{_PREFIX}{chunks_done:06d}"
    partial = directory / f"{_PARTIAL}{final.name}"
    if ranks.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    ranks.barrier()
    save_file(_rng_state(), partial / f"rng-rank{ranks.rank}.safetensors")
    ranks.barrier()
    if ranks.is_main:
        adapter = partial / "adapter"
        peft_model.peft_config[adapter_name].save_pretrained(adapter)
        save_file(_adapter_tensors(peft_model, adapter_name), adapter / "adapter_model.safetensors")
        save_file(_optimizer_tensors(optimizer), partial / "optimizer.safetensors")
        state = {
            "format": FORMAT,
            "fingerprint": run_fingerprint,
            "parameters": list(parameter_names),
            "world_size": ranks.size,
            "result": result,
        }
        (partial / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # left by a run killed between renaming and cleaning up
            shutil.rmtree(final)
        os.rename(partial, final)
        for stale in directory.iterdir():
            if stale != final and stale.is_dir() and stale.name.startswith((_PREFIX, _PARTIAL)):
                shutil.rmtree(stale)
    ranks.barrier()
    return final


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    peft_model: PeftModel,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    parameter_names: Sequence[str],
    run_fingerprint: Mapping[str, Any],
    ranks: Ranks,
) -> dict[str, Any] | None:
    """Restore adapter weights, optimiser and RNG state from the latest checkpoint in ``directory`` and return its
    results so far; ``None`` when there is none. Raises ``CheckpointError`` when it is corrupt or another run's."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    fix = f"delete {path} to start over"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        version, saved_fingerprint = state["format"], state["fingerprint"]
        saved_names, result = state["parameters"], state["result"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({_reason(exc)} in state.json): {fix}") from exc
    if version != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {version}, this version of peft-locas reads {FORMAT}: {fix}"
        )
    _check_fingerprint(path, saved_fingerprint, run_fingerprint)
    if saved_names != list(parameter_names):
        raise CheckpointError(f"checkpoint {path} was saved for other trainable parameters than this model's: {fix}")
    try:
        _load_adapter(path, peft_model, adapter_name)
        optimizer.load_state_dict(_optimizer_state(optimizer, load_file(path / "optimizer.safetensors")))
        rng = path / f"rng-rank{ranks.rank}.safetensors"
        _set_rng_state(load_file(rng if rng.exists() else path / "rng-rank0.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({_reason(exc)}): {fix}") from exc
    return result


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The most advanced complete checkpoint in ``directory``, if any."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    return complete[-1] if complete else None


def _check_fingerprint(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    for part, what in (("model", "model"), ("adapter", "adapter config"), ("settings", "settings"), ("text", "text")):
        if saved.get(part) != current[part]:
            difference = _difference(part, saved.get(part), current[part])
            raise CheckpointError(
                f"checkpoint {path} belongs to another run ({what}: {difference}); "
                f"use another checkpoint directory, or delete {path} to start over"
            )


def _difference(part: str, saved: Any, current: Mapping[str, Any]) -> str:
    if not isinstance(saved, Mapping):
        return "unreadable in the checkpoint"
    if part == "model":
        if saved.get("summary") != current["summary"]:
            return f"checkpoint: {saved.get('summary')}; now: {current['summary']}"
        return "same architecture, another config or other weights"
    if part == "text":
        return (
            f"checkpoint: {saved.get('tokens')} tokens, sha256 {str(saved.get('sha256'))[:12]}; "
            f"now: {current['tokens']} tokens, sha256 {current['sha256'][:12]}"
        )
    keys = sorted(set(saved) | set(current))
    changed = [
        f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)
    ]
    return ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")


def _load_adapter(path: Path, peft_model: PeftModel, adapter_name: str) -> None:
    """Load the saved adapter weights, after checking they are exactly this adapter's tensors."""
    saved = load_file(path / "adapter" / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    for key in sorted(set(saved) | set(expected)):
        if key not in saved or key not in expected or saved[key].shape != expected[key].shape:
            raise ValueError(f"adapter tensor {key} is missing or has another shape")
    set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)


def _adapter_tensors(peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as ``"<index>.<name>"`` tensors (AdamW keeps only tensors there)."""
    tensors = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A state dict for ``optimizer.load_state_dict``: the saved per-parameter state with the optimiser's own
    (freshly configured, identical) parameter groups."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _reason(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
