"""One rank of the 2-process gloo run in test_distributed_init.py: initialise Locas memories on this rank's share.

Usage: python distributed_init_worker.py RANK WORLD_SIZE STORE_FILE OUTPUT_FILE
"""

import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from tiny_models import tiny_model, tokens

from peft_locas import LocasConfig, LocasLayer, init_locas_weights

CASES = (("llama", "top_k"), ("llama", "activation_keys"), ("gpt2", "bottom_k"), ("gpt2", "gradient"))


def shard(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0 gets two batches, rank 1 one right-padded batch: uneven shares, as a DistributedSampler may give."""
    if rank == 0:
        return [{"input_ids": tokens(2, 8, seed=10)}, {"input_ids": tokens(1, 6, seed=11)}]
    input_ids = tokens(2, 7, seed=12)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    return [{"input_ids": input_ids, "attention_mask": attention_mask}]


def memories(family: str, method: str, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The memory tensors after initialising a fresh tiny model on ``batches``, by parameter name."""
    model = get_peft_model(tiny_model(family), LocasConfig(r=5, init_weights="data"))
    init_locas_weights(model, batches, method=method, show_progress_bar=False)
    return {
        f"{name}.{part}": tensor.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, LocasLayer)
        for part, tensor in module.locas_memory["default"].state_dict().items()
    }


def main(rank: int, world_size: int, store: str, output: str, mode: str = "good") -> None:
    """``mode="bad"``: rank 1's batch lacks ``input_ids``; every rank prints its one-line error and exits with 1."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        if mode == "bad":
            batches = shard(rank) if rank == 0 else [{"labels": tokens(1, 6, seed=13)}]
            try:
                memories("llama", "top_k", batches)
            except ValueError as exc:
                print(f"error: {exc}")
                sys.exit(1)
        else:
            torch.save({case: memories(*case, shard(rank)) for case in CASES}, output)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
