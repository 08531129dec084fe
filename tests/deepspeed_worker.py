"""One rank of `test_deepspeed.py`: the FSDP2 worker's training (`fsdp2_worker.py`: same model, batches, steps and
learning rate), under DeepSpeed ZeRO stage ``STAGE`` with torch's AdamW, the memory clipped after every step with
`clip_memory_norms_()`; rank 0 saves the optimiser's full fp32 rows of every memory parameter. Both stages run in one
launch (a DeepSpeed start costs seconds). Usage: ``torchrun --nproc_per_node 2 deepspeed_worker.py OUT_DIR``, writing
``OUT_DIR/zero2.safetensors`` and ``OUT_DIR/zero3.safetensors``."""

import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from fsdp2_worker import LR, batches, make_model
from safetensors.torch import save_file


def run(stage: int, out: str) -> None:
    model = make_model()
    parameters = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(parameters, lr=LR), config=config, model_parameters=parameters
    )
    rank = dist.get_rank()
    engine.train()
    for batch in batches():
        batch = batch[2 * rank : 2 * rank + 2]
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
        model.clip_memory_norms_()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    rows = {name: safe_get_full_fp32_param(p).cpu() for name, p in model.named_parameters() if name in names}
    if rank == 0:
        save_file({name.replace(".default", ""): tensor.contiguous() for name, tensor in rows.items()}, out)
    dist.barrier()


if __name__ == "__main__":
    for zero_stage in (2, 3):
        run(zero_stage, f"{sys.argv[1]}/zero{zero_stage}.safetensors")
