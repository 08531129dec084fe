"""One rank of the 2-process run in test_memorize_distributed.py, started by torchrun (as accelerate launch would).

Usage: torchrun --standalone --nproc_per_node 2 memorize_distributed_worker.py OUT_DIR [--objective distill]
Each rank writes OUT_DIR/rank<k>.json (losses) and OUT_DIR/rank<k>.safetensors (adapter weights). With
``--objective distill`` the run is test_distill.py's distillation run instead of test_memorize_distributed.py's.
"""

import argparse
import json
from pathlib import Path

import torch.distributed as dist
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_distill import distributed_run
from test_memorize_distributed import run

RUNS = {"ntp": run, "distill": distributed_run}


def main(out: str, objective: str = "ntp") -> None:
    dist.init_process_group("gloo")
    try:
        result, scored = RUNS[objective]()
        rank = dist.get_rank()
        record = {"losses": result.losses, "baseline_losses": result.baseline_losses, "scored": scored.losses}
        record["train_losses"] = result.train_losses
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
        weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(result.model).items()}
        save_file(weights, Path(out) / f"rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--objective", choices=sorted(RUNS), default="ntp")
    arguments = parser.parse_args()
    main(arguments.out, arguments.objective)
