"""Train a Locas memory with the Hugging Face Trainer; a callback applies the paper's norm clipping after each step."""

# --8<-- [start:trainer]
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from peft_locas import LocasConfig, init_locas_weights

from _tiny import sample_text, tiny_model_dir  # docs helpers: a tiny offline model folder, a sample text

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"


class ClipMemoryNorms(TrainerCallback):
    """Project every memory row back into the ``max_norm`` ball after each optimiser step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.clip_memory_norms_()


tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=16))

ids = tokenizer(sample_text(), return_tensors="pt").input_ids[0]
train_dataset = [{"input_ids": chunk, "labels": chunk} for chunk in ids.split(128)[:-1]]  # equal-length chunks
init_locas_weights(model, [{"input_ids": row["input_ids"][None]} for row in train_dataset])

args = TrainingArguments(
    output_dir="trainer-out",
    learning_rate=4e-3,  # the paper's rate for Locas-GLU
    per_device_train_batch_size=2,
    num_train_epochs=2,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
)
trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=[ClipMemoryNorms()])
trainer.train()
model.save_pretrained("my-memory")
# --8<-- [end:trainer]

for name, parameter in model.named_parameters():
    if parameter.requires_grad:
        assert parameter.norm(dim=-1).max() <= 1 + 1e-5, name  # the callback ran after the last step
