"""The memorisation engine: `memorization` (``memorize()``, ``evaluate()``: score a chunk, then train on it),
`batched_memorization` (several texts side by side), `chunking` (the windows it reads), `objectives` (next-token
prediction, self-distillation), `checkpointing` (resumable runs), `results` (``MemorizeResult``) and `plotting`.

It builds on the tuner and the initialisation (`peft_locas.tuner`, `peft_locas.init`); conversations come from
`peft_locas.recall.dialogue`. Nothing is imported here.
"""
