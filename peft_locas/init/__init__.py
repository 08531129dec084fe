"""Initialising Locas memories (``locas_method.md`` section 3), one concept per module, each calling only those above
it in this list:

- `units`: data-free unit math on a block's weights (row normalisation and clipping, cloning, Gaussian rows, the
  construction-time default, ``tau="auto"``); the tuner uses it when an adapter is created.
- `writing`: read an adapter's Locas layers and config, write or append memories, keep ``r`` truthful.
- `nlsvd`: NL-SVD (principal keys of a key scatter; compressing a Locas-MLP memory).
- `stream`: the frozen base model run over a dataloader, the tokens that count, errors failing every rank together.
- `statistics`: how strongly the context activates each base unit (``top_k`` / ``bottom_k``).
- `keys`: activation keys (``activation_keys``).
- `gradients`: one gradient slot per token (``gradient``, Locas-MLP).
- `data`: `init_locas_weights`, `get_locas_init_state` and `LocasInitState`, which compose the above.

Nothing is imported here, so the tuner can import `units` without loading the data-driven modules (which import
the tuner's layer).
"""
