"""One rank of the 2-process run in test_memorize_distributed.py, started by torchrun (as accelerate launch would).

Usage: torchrun --standalone --nproc_per_node 2 memorize_distributed_worker.py OUT_DIR
Each rank writes OUT_DIR/rank<k>.json (losses) and OUT_DIR/rank<k>.safetensors (adapter weights).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_memorize_distributed import run


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        result, scored = run()
        rank = dist.get_rank()
        record = {"losses": result.losses, "baseline_losses": result.baseline_losses, "scored": scored.losses}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
        weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(result.model).items()}
        save_file(weights, Path(out) / f"rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
