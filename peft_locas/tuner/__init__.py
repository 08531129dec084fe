"""The PEFT tuner: `config` (``LocasConfig``), `layer` (``LocasLayer``, wrapping one MLP block), `model`
(``LocasModel``, injecting, merging, unloading), `composition` (concatenating memories' units), `registration`
(``LOCAS`` as a PEFT method; `_enum` extends ``PeftType``) and `model_card` (what a saved adapter's README says).

These modules import from `peft_locas.weights`, `peft_locas.init.units` and the import hook only;
`tests/test_layout.py` holds them to it. Nothing is imported here (importing ``peft_locas`` stays cheap).
"""
