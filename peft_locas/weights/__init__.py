"""The weights a Locas memory reads and writes, below the PEFT tuner: which MLP block layouts exist (`blocks`), how a
projection's weight is read and rewritten whatever its type (`projections`; bitsandbytes 4/8-bit in `bnb`; blocks
accelerate offloaded in `offload`), one adapter's memory parameters and computation (`memory`; DeepSpeed ZeRO's
managed rows in `zero`), and merged blocks exported as a vanilla checkpoint (`export`).

These modules import nothing of the package above them except `peft_locas.init.units` (data-free unit math);
`tests/test_layout.py` holds them to it. Nothing is imported here.
"""
