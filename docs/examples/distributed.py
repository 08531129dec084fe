"""Data-parallel initialisation and training of a Locas memory with accelerate.

Run with ``accelerate launch distributed.py`` (any number of processes, GPUs or CPUs); ``python distributed.py``
runs it as a single process.
"""

# --8<-- [start:ddp]
import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, init_locas_weights

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"


def main():
    accelerator = Accelerator()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(sample_text(2), return_tensors="pt").input_ids[0]
    dataset = [{"input_ids": chunk, "labels": chunk} for chunk in ids.split(64)[:-1]]  # equal-length chunks

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=16))
    model.to(accelerator.device)

    # 1. initialise from data: each rank reads its own shard, the statistics are summed over all ranks,
    #    so every rank selects the same units (before `prepare`, which wraps the model)
    init_loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=2))
    init_locas_weights(model, init_loader, show_progress_bar=accelerator.is_main_process)

    # 2. train: build the optimiser after the init (it replaces the memory parameters), then prepare as usual
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    loader = DataLoader(dataset, batch_size=2, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.unwrap_model(model).clip_memory_norms_()  # on the PeftModel inside the DDP wrapper

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained("my-memory")
    return accelerator.unwrap_model(model)  # (for the docs test)


if __name__ == "__main__":
    main()
# --8<-- [end:ddp]
