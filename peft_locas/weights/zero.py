"""Memory rows that DeepSpeed ZeRO manages: the optimiser updates its own fp32 master copy (ZeRO 1 and 2) or a
partition of it (ZeRO 3) and writes it back into the model at the next step, so clipping only the model's weights
(`peft_locas.init.units.clip_rows_`) changes nothing the optimiser sees: measured under ZeRO-2 and ZeRO-3 on two
CPU ranks, the master rows grow past the bound (0.079, 0.132, 0.171 after three steps for a bound of 0.05). Here the
rows are clipped where the optimiser keeps them, through DeepSpeed's public ``safe_get/set_full_fp32_param``, and in
the model's copy, so the next forward and the next step both see clipped rows, as without ZeRO.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..init.units import clip_rows_


def is_zero_managed(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO keeps this parameter's optimiser copy (stage 3 partitions it: ``ds_id``; stages 1 and
    2 and the bf16 optimiser link it to a flat fp32 partition: ``_hp_mapping``)."""
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def clip_zero_rows_(parameter: torch.nn.Parameter, max_norm: float) -> None:
    """`clip_rows_` for a ZeRO-managed parameter: its full fp32 master rows are gathered, clipped and written back,
    and the model's copy is set to them. Collective: every rank must call it, for the same parameters in the same
    order (`LocasModel.clip_memory_norms_` does)."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    rows = safe_get_full_fp32_param(parameter)
    clip_rows_(rows, max_norm)
    safe_set_full_fp32_param(parameter, rows)
    if hasattr(parameter, "ds_id"):  # ZeRO-3: the model's copy is partitioned too; rank 0's rows are scattered back
        with zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            if dist.get_rank() == 0:
                parameter.copy_(rows.to(parameter.dtype))
    else:
        with torch.no_grad():
            parameter.copy_(rows.to(parameter.dtype))
