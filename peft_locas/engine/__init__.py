"""The memorisation engine: `memorization` (``memorize()``, ``evaluate()``: score a chunk, then train on it),
`batched_memorization` (several texts side by side), `chunking` (the windows it reads), `objectives` (next-token
prediction, self-distillation), `self_study` (questions the model writes about each chunk and answers reading it,
distilled into the memory), `checkpointing` (resumable runs), `results` (``MemorizeResult``) and `plotting`.

It builds on the tuner and the initialisation (`peft_locas.tuner`, `peft_locas.init`) and on `peft_locas.recall`
(conversations, asking the model), which imports nothing from it. Nothing is imported here.
"""
