"""Find the prepared offline assets from Python (prepare them first with `python -m peft_locas.assets`)."""

# --8<-- [start:assets]
from peft_locas import assets

print(assets.cache_root())  # $PEFT_LOCAS_CACHE, else ~/.cache/peft-locas
model_dir = assets.default_model_dir()  # the SmolLM2-135M-Instruct folder, or None if not prepared
emma = assets.book_path("emma")  # <cache>/books/emma.txt, or None if not prepared
print(model_dir, emma, assets.ALL_BOOKS)

if model_dir is not None and emma is not None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(len(tokenizer(emma.read_text(encoding="utf-8")).input_ids), "tokens")  # about 200K
# --8<-- [end:assets]
