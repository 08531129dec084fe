"""One rank of `test_fsdp2.py`: a Locas memory trained under FSDP2 (`fully_shard`, gloo on CPU), each rank on its
half of every batch, the memory's rows clipped after every step through the sharded parameters, then saved on rank 0
from the full state dict. Usage: ``torchrun --nproc_per_node 2 fsdp2_worker.py OUT_DIR``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from tiny_models import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from peft_locas import LocasConfig

STEPS, LR = 4, 1e-2


def batches() -> list[torch.Tensor]:
    """The same four batches of 4 sequences on every rank (and in the single-process reference)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, 128, (4, 16), generator=generator) for _ in range(STEPS)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama"), LocasConfig(r=8, max_norm=0.05))


def train(model, optimizer, rows: slice) -> None:
    model.train()
    for batch in batches():
        batch = batch[rows]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clip_memory_norms_()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = make_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    share = 4 // size
    train(model, optimizer, slice(rank * share, (rank + 1) * share))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
