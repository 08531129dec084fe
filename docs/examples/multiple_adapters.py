"""Several Locas memories on one base model: one per document, switched per request, combined, or merged together."""

# --8<-- [start:adapters]
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig, init_locas_weights

from _tiny import tiny_model_dir  # docs helper: a tiny offline model folder

model_dir = tiny_model_dir()  # stands in for a real checkpoint, e.g. "HuggingFaceTB/SmolLM2-135M"


def train(model, batches, steps=3):
    """A few steps of next-token training on the active adapter (see the quick start)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    model.train()
    for _ in range(steps):
        for batch in batches:
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.clip_memory_norms_()
    model.eval()


tokenizer = AutoTokenizer.from_pretrained(model_dir)
books = {"austen": "It is a truth universally acknowledged ...", "melville": "Call me Ishmael. Some years ago ..."}
batches = {name: [tokenizer(text, return_tensors="pt")] for name, text in books.items()}

model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LocasConfig(r=16), adapter_name="austen")
model.add_adapter("melville", LocasConfig(r=16))
for name in books:
    model.set_adapter(name)  # makes `name` the active and only trainable adapter
    init_locas_weights(model, batches[name], adapter_name=name)
    train(model, batches[name])  # builds its optimiser after the init, over the active adapter's parameters
model.save_pretrained("memories")  # one folder per adapter: memories/austen/, memories/melville/
# --8<-- [end:adapters]

x = batches["melville"][0]["input_ids"]
outputs = {}
# --8<-- [start:switch]
with torch.no_grad():
    model.set_adapter("austen")
    outputs["austen"] = model(x).logits
    model.set_adapter("melville")
    outputs["melville"] = model(x).logits
    with model.disable_adapter():  # the base model, untouched
        outputs["base"] = model(x).logits
    model.base_model.set_adapter(["austen", "melville"])  # both memories at once: their outputs add up
    outputs["both"] = model(x).logits
# --8<-- [end:switch]
assert not torch.allclose(outputs["austen"], outputs["melville"])
torch.testing.assert_close(
    outputs["both"] - outputs["base"],
    (outputs["austen"] - outputs["base"]) + (outputs["melville"] - outputs["base"]),
    atol=5e-3,  # exact for the MLP outputs; the logits pass the sum through later layers
    rtol=0,
)

# --8<-- [start:reload]
base = AutoModelForCausalLM.from_pretrained(model_dir)
model = PeftModel.from_pretrained(base, "memories/austen", adapter_name="austen")
model.load_adapter("memories/melville", adapter_name="melville")
model.set_adapter("melville")
model.delete_adapter("austen")  # frees its memory
merged = model.merge_and_unload()  # a vanilla checkpoint holding the Melville memory (intermediate size + 16)
# --8<-- [end:reload]
assert merged.config.intermediate_size == 128 + 16
with torch.no_grad():
    torch.testing.assert_close(merged(x).logits, outputs["melville"], atol=1e-4, rtol=1e-4)
